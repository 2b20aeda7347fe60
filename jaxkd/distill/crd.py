"""CRD (Tian et al. 2020) as its official code (RepDistiller, copied into the OFA code).

Both embeddings go through a Linear to 128-d and L2 normalisation. Two memory banks hold a
128-d vector per train example (student and teacher side), initialised uniform in
+-1/sqrt(128/3). Each step draws 16384 negatives per example (rng 'dropout'), with
replacement, from the train examples of OTHER classes, as the official CIFAR/ImageNet data
loaders (`is_sample=True`); `negatives="uniform"` draws them from the whole train set instead
(RepDistiller's sampler without labels). The example's own row (`batch['index']`) is the
positive. Scores
`exp(<bank row, anchor> / T) / Z` use the teacher bank with the student anchor and the student
bank with the teacher anchor; each Z is fixed at the first training step to
`mean(exp scores) * N`, as the official code. The NCE loss of both sides is summed:
`CE + kd_weight * (NCE_s + NCE_t)`. After scoring, the banks' rows of the batch become
`normalize(momentum * row + (1 - momentum) * anchor)`.

The banks and the Z constants form the non-trainable collection 'memory' (carried in the
train state and checkpointed), with the train split's labels grouped by class for the
other-class draw (computed on device, no host round trip). Difference from the official code:
banks and Z are global (one copy updated with the whole batch), not per-GPU.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.distill.base import Term, derived
from jaxkd.distill.feature import FeatureMethod, register_feature_method
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


NEGATIVES = ("other_class", "uniform")


def class_groups(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The train labels laid out for other-class draws: `order` (example indices sorted by
    class), `start` and `count` (each class's slice of `order`) and `label` (per example)."""
    labels = np.asarray(labels, np.int64)
    count = np.bincount(labels, minlength=int(labels.max()) + 1)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return {"order": np.argsort(labels, kind="stable").astype(np.int32),
            "start": start.astype(np.int32), "count": count.astype(np.int32),
            "label": labels.astype(np.int32)}


def other_class_draw(rng, groups, index, num_negatives: int):
    """[B, K] example indices drawn uniformly, with replacement, among the examples whose
    class differs from example `index[b]`'s: a uniform position in `order` with the anchor's
    class slice cut out."""
    label = groups["label"][index]
    start, count = groups["start"][label][:, None], groups["count"][label][:, None]
    num_data = groups["order"].shape[0]
    position = jax.random.randint(rng, (index.shape[0], num_negatives), 0, num_data - count,
                                  dtype=jnp.int32)
    position = jnp.where(position >= start, position + count, position)
    return groups["order"][position]


class ContrastIndices(nn.Module):
    """[B, 1 + K] bank rows to score: the example's own index, then K negatives (other
    classes, or uniform when `groups` is None).

    Outside training (no 'dropout' rng is needed there) the negatives are a fixed draw.
    """

    num_data: int
    num_negatives: int

    def __call__(self, index, groups, *, train: bool):
        rng = self.make_rng("dropout") if train else jax.random.PRNGKey(0)
        index = index.astype(jnp.int32)
        if groups is None:
            negatives = jax.random.randint(rng, (index.shape[0], self.num_negatives), 0,
                                           self.num_data, dtype=jnp.int32)
        else:
            negatives = other_class_draw(rng, groups, index, self.num_negatives)
        return jnp.concatenate([index[:, None], negatives], axis=1)


@register_feature_method("crd", unsupervised_defaults={"negatives": "uniform"},
                         train_labels=True)
class CRD(FeatureMethod):
    feat_dim: int = 128
    num_negatives: int = 16384
    temperature: float = 0.07
    momentum: float = 0.5
    kd_weight: float = 0.8
    negatives: str = "other_class"  # NEGATIVES
    num_data: int = derived()
    # class_groups() of the train labels, for negatives="other_class"
    groups: dict = derived()

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        if config["negatives"] not in NEGATIVES:
            raise ConfigError(f"crd negatives must be one of {NEGATIVES}, got "
                              f"{config['negatives']!r}")
        if cls.unsupervised and config["negatives"] != "uniform":
            raise ConfigError("crd_unsup reads no labels: its negatives are drawn uniformly "
                              "(negatives='uniform')")
        if ctx.num_train_examples < 1:
            raise ConfigError("CRD keeps a memory bank row per train example: the trainer must "
                              "pass MethodContext.num_train_examples")
        groups = None
        if config["negatives"] == "other_class":
            if ctx.train_labels is None or len(ctx.train_labels) != ctx.num_train_examples:
                raise ConfigError("CRD's other-class negatives need the label of every train "
                                  "example (MethodContext.train_labels)")
            groups = class_groups(ctx.train_labels)
            if int(groups["count"].max()) == ctx.num_train_examples:
                raise ConfigError("CRD's other-class negatives need at least two classes in "
                                  "the train split")
        return {**super().derive(config, student, teacher, ctx),
                "num_data": ctx.num_train_examples, "groups": groups}

    def _bank(self, name):
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        shape = (self.num_data, self.feat_dim)
        return self.variable("memory", name, lambda: jax.random.uniform(
            self.make_rng("params"), shape, jnp.float32, -bound, bound))

    def _class_groups(self):
        """The class layout as constants of the 'memory' collection (state, not program)."""
        if self.groups is None:
            return None
        return {key: self.variable("memory", f"class_{key}", lambda v=value: jnp.asarray(v)
                                   ).value for key, value in self.groups.items()}

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

    def distill_terms(self, student, teacher, batch, *, train: bool):
        f_s = Embed(self.feat_dim, name="embed_student")(student.features["embedding"])
        f_t = Embed(self.feat_dim, name="embed_teacher")(teacher.features["embedding"])
        bank_s, bank_t = self._bank("student"), self._bank("teacher")
        z_s = self.variable("memory", "z_student", lambda: jnp.float32(-1.0))
        z_t = self.variable("memory", "z_teacher", lambda: jnp.float32(-1.0))
        index = batch["index"].astype(jnp.int32)
        rows = ContrastIndices(self.num_data, self.num_negatives, name="negatives")(
            index, self._class_groups(), train=train)
        scores_s, z_s_value = self._scores(bank_t, rows, f_s, z_s)  # student anchor
        scores_t, z_t_value = self._scores(bank_s, rows, f_t, z_t)  # teacher anchor
        nce_s, nce_t = nce_loss(scores_s, self.num_data), nce_loss(scores_t, self.num_data)
        if train:
            z_s.value, z_t.value = z_s_value, z_t_value
            self._update(bank_s, index, f_s)
            self._update(bank_t, index, f_t)
        return {"crd": Term(self.kd_weight, nce_s + nce_t),
                "crd_student": Term(None, nce_s), "crd_teacher": Term(None, nce_t)}
