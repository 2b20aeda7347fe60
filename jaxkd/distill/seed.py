"""SEED (Fang et al. 2021) as CoSS's code base (URepDistiller, after the SEED code) runs it,
and SEED + space similarity (CoSS supplement section 3).

Unsupervised (labels=False): no label is read and the student is evaluated by k-NN. The
student's pre-logits embedding goes through an MLP head, Linear(D_s, D_s) -> ReLU ->
Linear(D_s, D) (SEED's student_mlp, PyTorch's default init), D the width of the teacher's
output: its pre-logits embedding (`teacher_output="embedding"`) or its logits
(`"logits"`, for a teacher whose classifier is its self-supervised projection, as SEED's
MoCo-v2 teacher with its 128-d head). The loss is losses.seed_loss against a queue of
`queue_size` L2-normalised teacher outputs (the non-trainable collection 'queue', random unit
vectors at first, as the original), each training step enqueuing the whole (global) batch,
which must divide the queue size (the original asserts it). `ss_weight` > 0 adds CoSS's space
similarity between the head's output and the teacher output (losses.space_similarity_loss,
per group of `stats_groups` as CoSS, without temperature: the official ImageNet CoSS code
normalises after dividing by its temperatures, which cancels them). Defaults are SEED's:
queue 65536, student temperature 0.2, teacher temperature 1e-4.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.distill.base import Method, Term, batch_groups, derived, register_method
from jaxkd.errors import ConfigError
from jaxkd.losses._common import l2_normalize
from jaxkd.models.layers import torch_linear_init

TEACHER_OUTPUTS = ("embedding", "logits")


class MLPHead(nn.Module):
    """Linear(D, D) -> ReLU -> Linear(D, out_dim), PyTorch's default init."""

    out_dim: int

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        kernel_init, bias_init = torch_linear_init(dim)
        x = nn.relu(nn.Dense(dim, kernel_init=kernel_init, bias_init=bias_init,
                             name="fc1")(x))
        return nn.Dense(self.out_dim, kernel_init=kernel_init, bias_init=bias_init,
                        name="fc2")(x)


@register_method("seed", labels=False)
class SEED(Method):
    queue_size: int = 65536
    student_temp: float = 0.2
    teacher_temp: float = 1e-4
    teacher_output: str = "embedding"  # TEACHER_OUTPUTS
    ss_weight: float = 0.0
    stats_groups: int = 0  # 0: one group per device
    target_dim: int = derived()
    num_groups: int = derived()

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        if config["teacher_output"] not in TEACHER_OUTPUTS:
            raise ConfigError(f"seed teacher_output must be one of {TEACHER_OUTPUTS}, got "
                              f"{config['teacher_output']!r}")
        if config["queue_size"] < 1:
            raise ConfigError(f"seed queue_size must be positive, got {config['queue_size']}")
        return {**super().derive(config, student, teacher, ctx),
                "target_dim": (teacher.embed_dim if config["teacher_output"] == "embedding"
                               else teacher.num_classes),
                "num_groups": batch_groups(config["stats_groups"], ctx)}

    @nn.compact
    def __call__(self, student, teacher, batch, *, train: bool):
        del batch  # Unsupervised: labels are never read.
        embedding = MLPHead(self.target_dim, name="head")(
            student.features["embedding"].astype(jnp.float32))
        target = (teacher.features["embedding"] if self.teacher_output == "embedding"
                  else teacher.logits).astype(jnp.float32)
        batch_size = embedding.shape[0]
        if self.queue_size % batch_size:
            raise ConfigError(f"the SEED queue ({self.queue_size}) must hold a whole number of "
                              f"batches of {batch_size}")
        queue = self.variable("queue", "keys", lambda: l2_normalize(jax.random.normal(
            self.make_rng("params"), (self.queue_size, self.target_dim), jnp.float32), 1))
        pointer = self.variable("queue", "pointer", lambda: jnp.zeros((), jnp.int32))
        terms = {"seed": Term(1.0, losses.seed_loss(
            embedding, target, queue.value, student_temp=self.student_temp,
            teacher_temp=self.teacher_temp))}
        if self.ss_weight:
            terms["space_similarity"] = Term(self.ss_weight, losses.mean_over_groups(
                "space_similarity_loss", losses.space_similarity_loss, self.num_groups,
                embedding, target))
        if train:
            keys = l2_normalize(jax.lax.stop_gradient(target), 1)
            queue.value = jax.lax.dynamic_update_slice(queue.value, keys,
                                                       (pointer.value, jnp.int32(0)))
            pointer.value = (pointer.value + batch_size) % self.queue_size
        return terms
