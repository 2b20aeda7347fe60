"""CRD (Tian et al. 2020) as its official code (RepDistiller, copied into the OFA code).

Both embeddings go through a Linear to 128-d and L2 normalisation. Two memory banks hold a
128-d vector per train example (student and teacher side), initialised uniform in
+-1/sqrt(128/3). Each step draws 16384 negatives per example uniformly over the train set
(rng 'dropout'); the example's own row (`batch['index']`) is the positive. Scores
`exp(<bank row, anchor> / T) / Z` use the teacher bank with the student anchor and the student
bank with the teacher anchor; each Z is fixed at the first training step to
`mean(exp scores) * N`, as the official code. The NCE loss of both sides is summed:
`CE + kd_weight * (NCE_s + NCE_t)`. After scoring, the banks' rows of the batch become
`normalize(momentum * row + (1 - momentum) * anchor)`.

The banks and the Z constants form the non-trainable collection 'memory' (carried in the
train state and checkpointed). Differences from the official code: negatives are drawn
uniformly (RepDistiller's sampler without a data-loader index), while its CIFAR/ImageNet data
loaders draw them from other classes only, which needs every example's label up front; a
uniform draw hits the anchor's class with probability 1/num_classes. Banks and Z are global
(one copy updated with the whole batch), not per-GPU.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.distill.base import register_method, supervised_loss
from jaxkd.errors import ConfigError
from jaxkd.models.layers import torch_linear_init

_NCE_EPS = 1e-7


def nce_loss(scores, num_data: int):
    """The official ContrastLoss: scores [B, 1 + K] (positive first) against noise 1/N.

    -(sum_b log(P_pos / (P_pos + K/N + eps)) + sum_{b,k} log((K/N) / (P_neg + K/N + eps))) / B.
    """
    num_negatives = scores.shape[1] - 1
    noise = num_negatives / num_data
    log_d1 = jnp.log(scores[:, 0] / (scores[:, 0] + noise + _NCE_EPS))
    log_d0 = jnp.log(noise / (scores[:, 1:] + noise + _NCE_EPS))
    return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / scores.shape[0]


def _l2_normalize(x):
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


class Embed(nn.Module):
    """Linear (PyTorch's default init) -> L2 normalisation."""

    feat_dim: int

    @nn.compact
    def __call__(self, x):
        kernel_init, bias_init = torch_linear_init(x.shape[-1])
        x = nn.Dense(self.feat_dim, kernel_init=kernel_init, bias_init=bias_init,
                     name="linear")(x.astype(jnp.float32))
        return _l2_normalize(x)


class ContrastIndices(nn.Module):
    """[B, 1 + K] bank rows to score: the example's own index, then K uniform negatives.

    Outside training (no 'dropout' rng is needed there) the negatives are a fixed draw.
    """

    num_data: int
    num_negatives: int

    def __call__(self, index, *, train: bool):
        rng = self.make_rng("dropout") if train else jax.random.PRNGKey(0)
        negatives = jax.random.randint(rng, (index.shape[0], self.num_negatives), 0,
                                       self.num_data, dtype=jnp.int32)
        return jnp.concatenate([index.astype(jnp.int32)[:, None], negatives], axis=1)


class CRD(nn.Module):
    num_data: int
    feat_dim: int = 128
    num_negatives: int = 16384
    temperature: float = 0.07
    momentum: float = 0.5
    kd_weight: float = 0.8
    label_smoothing: float = 0.0

    def _bank(self, name):
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        shape = (self.num_data, self.feat_dim)
        return self.variable("memory", name, lambda: jax.random.uniform(
            self.make_rng("params"), shape, jnp.float32, -bound, bound))

    def _scores(self, bank, rows, anchor, z):
        """exp(<bank[rows], anchor> / T) / Z; Z set from these scores while still unset."""
        weights = jax.lax.stop_gradient(bank.value[rows])
        scores = jnp.exp(jnp.einsum("bkd,bd->bk", weights, anchor,
                                    precision=jax.lax.Precision.HIGHEST) / self.temperature)
        first = jax.lax.stop_gradient(jnp.mean(scores)) * self.num_data
        z_value = jnp.where(z.value < 0, first, z.value)
        return scores / z_value, z_value

    def _update(self, bank, index, anchor):
        rows = (self.momentum * bank.value[index] +
                (1.0 - self.momentum) * jax.lax.stop_gradient(anchor))
        bank.value = bank.value.at[index].set(_l2_normalize(rows))

    @nn.compact
    def __call__(self, student_out, teacher_out, batch, *, train: bool):
        f_s = Embed(self.feat_dim, name="embed_student")(student_out[1]["embedding"])
        f_t = Embed(self.feat_dim, name="embed_teacher")(teacher_out[1]["embedding"])
        bank_s, bank_t = self._bank("student"), self._bank("teacher")
        z_s = self.variable("memory", "z_student", lambda: jnp.float32(-1.0))
        z_t = self.variable("memory", "z_teacher", lambda: jnp.float32(-1.0))
        index = batch["index"].astype(jnp.int32)
        rows = ContrastIndices(self.num_data, self.num_negatives, name="negatives")(
            index, train=train)
        scores_s, z_s_value = self._scores(bank_t, rows, f_s, z_s)  # student anchor
        scores_t, z_t_value = self._scores(bank_s, rows, f_t, z_t)  # teacher anchor
        nce_s, nce_t = nce_loss(scores_s, self.num_data), nce_loss(scores_t, self.num_data)
        if train:
            z_s.value, z_t.value = z_s_value, z_t_value
            self._update(bank_s, index, f_s)
            self._update(bank_t, index, f_t)
        crd = nce_s + nce_t
        ce = supervised_loss(student_out[0], batch["label"], self.label_smoothing)
        return ce + self.kd_weight * crd, {"ce": ce, "crd": crd, "crd_student": nce_s,
                                           "crd_teacher": nce_t}


@register_method("crd", defaults={"feat_dim": 128, "num_negatives": 16384, "temperature": 0.07,
                                  "momentum": 0.5, "kd_weight": 0.8})
def build(config, student, teacher, ctx):
    del student, teacher
    if ctx.num_train_examples < 1:
        raise ConfigError("CRD keeps a memory bank row per train example: the trainer must "
                          "pass MethodContext.num_train_examples")
    return CRD(num_data=ctx.num_train_examples, feat_dim=config.feat_dim,
               num_negatives=config.num_negatives, temperature=config.temperature,
               momentum=config.momentum, kd_weight=config.kd_weight,
               label_smoothing=ctx.label_smoothing)
