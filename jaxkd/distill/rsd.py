"""RSD: redundancy suppression between the AAD-projected student and the teacher embeddings.

Total loss `CE + lambda * L_RSD` (no teacher-logit term). The official code computes the batch
statistics per GPU; `stats_groups` reproduces that: 0 = one group per device (default), 1 = the
global batch, n = n contiguous groups.

Variants (the paper's ablations and more): `distance` "mse"/"huber", `normalize`, and `target`
"embedding" (default) or "logits" (RSD between the AAD-mapped student logits and the teacher's
logits). "rsd_ofa" adds OFA-KD's per-stage exit branches (jaxkd.distill.ofa) to RSD on the
embedding: `CE + lambda * L_RSD + ofa_weight * sum_k OFA(branch_k)`.
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.distill import ofa
from jaxkd.distill.base import register_method, supervised_loss
from jaxkd.errors import ConfigError
from jaxkd.models.layers import TRUNC_NORMAL_02, batch_norm


class AAD(nn.Module):
    """Architecture-agnostic decoupler: Linear -> BN -> GELU -> Linear, no biases."""

    hidden_dim: int
    out_dim: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Dense(self.hidden_dim, use_bias=False, kernel_init=TRUNC_NORMAL_02)(x)
        x = batch_norm(train)(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(self.out_dim, use_bias=False, kernel_init=TRUNC_NORMAL_02)(x)


_TARGETS = ("embedding", "logits")


class RSD(nn.Module):
    hidden_dim: int
    teacher_dim: int
    rsd_weight: float = 0.1
    kappa: float = 0.01
    distance: str = "mse"
    normalize: bool = True
    stats_groups: int = 1
    target: str = "embedding"
    label_smoothing: float = 0.0

    @nn.compact
    def __call__(self, student_out, teacher_out, batch, *, train: bool):
        student_vector, teacher_vector = (
            (student_out[1]["embedding"], teacher_out[1]["embedding"])
            if self.target == "embedding" else (student_out[0], teacher_out[0]))
        projected = AAD(self.hidden_dim, self.teacher_dim, name="aad")(
            student_vector.astype(jnp.float32), train=train)
        rsd = losses.rsd_loss_grouped(projected, teacher_vector, self.stats_groups,
                                      kappa=self.kappa, distance=self.distance,
                                      normalize=self.normalize)
        ce = supervised_loss(student_out[0], batch["label"], self.label_smoothing)
        return ce + self.rsd_weight * rsd, {"ce": ce, "rsd": rsd}


_RSD_DEFAULTS = {"expansion": 2.0, "rsd_weight": 0.1, "kappa": 0.01, "distance": "mse",
                 "normalize": True, "stats_groups": 0}


def _rsd(config, student, teacher, ctx, target):
    if target not in _TARGETS:
        raise ConfigError(f"rsd target must be one of {_TARGETS}, got {target!r}")
    student_dim, teacher_dim = ((student.embed_dim, teacher.embed_dim) if target == "embedding"
                                else (student.num_classes, teacher.num_classes))
    return RSD(hidden_dim=int(round(config.expansion * student_dim)), teacher_dim=teacher_dim,
               rsd_weight=config.rsd_weight, kappa=config.kappa, distance=config.distance,
               normalize=config.normalize,
               stats_groups=ctx.num_devices if config.stats_groups == 0 else config.stats_groups,
               target=target, label_smoothing=ctx.label_smoothing)


@register_method("rsd", defaults={**_RSD_DEFAULTS, "target": "embedding"})
def build(config, student, teacher, ctx):
    return _rsd(config, student, teacher, ctx, config.target)


class RSDWithOFABranches(nn.Module):
    """RSD on the embedding plus OFA-KD's exit branches, each against the teacher's logits."""

    rsd: RSD
    branches: ofa.OFABranches
    branch_gammas: tuple[tuple[int, float], ...]  # ((stage, gamma), ...)
    ofa_weight: float = 1.0
    temperature: float = 1.0

    def __call__(self, student_out, teacher_out, batch, *, train: bool):
        loss, metrics = self.rsd(student_out, teacher_out, batch, train=train)
        branch_logits = self.branches(student_out[1]["stages"], train=train)
        branches, parts = ofa.branch_losses(branch_logits, teacher_out[0], batch["label"],
                                            self.branch_gammas, self.temperature)
        return loss + self.ofa_weight * branches, {**metrics, "ofa": branches, **parts}


@register_method("rsd_ofa", defaults={**_RSD_DEFAULTS, "stages": (1, 2, 3, 4), "eps": 1.0,
                                      "branch_eps": (), "ofa_weight": 1.0, "temperature": 1.0})
def build_rsd_ofa(config, student, teacher, ctx):
    """`eps` is the branches' gamma (per stage with `branch_eps`); no final-logit OFA term."""
    gammas = ofa.check_branch_config(student, config.stages, config.eps, config.branch_eps)
    branches = ofa.OFABranches(student, teacher.embed_dim, tuple(s for s, _ in gammas))
    return RSDWithOFABranches(_rsd(config, student, teacher, ctx, "embedding"), branches,
                              gammas, ofa_weight=config.ofa_weight,
                              temperature=config.temperature)
