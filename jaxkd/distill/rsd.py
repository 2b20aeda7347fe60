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
from jaxkd.distill.base import Term, batch_groups, derived, register_method
from jaxkd.distill.feature import FeatureMethod, register_feature_method
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


@register_feature_method("rsd")
class RSD(FeatureMethod):
    expansion: float = 2.0
    rsd_weight: float = 0.1
    kappa: float = 0.01
    distance: str = "mse"
    normalize: bool = True
    stats_groups: int = 0  # 0: one group per device
    target: str = "embedding"
    hidden_dim: int = derived()
    teacher_dim: int = derived()
    num_groups: int = derived()  # stats_groups resolved

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        target = config["target"]
        if target not in _TARGETS:
            raise ConfigError(f"rsd target must be one of {_TARGETS}, got {target!r}")
        if cls.unsupervised and target != "embedding":
            raise ConfigError("rsd_unsup uses no logits: its target must be 'embedding'")
        student_dim, teacher_dim = ((student.embed_dim, teacher.embed_dim)
                                    if target == "embedding"
                                    else (student.num_classes, teacher.num_classes))
        return {**super().derive(config, student, teacher, ctx),
                "hidden_dim": int(round(config["expansion"] * student_dim)),
                "teacher_dim": teacher_dim,
                "num_groups": batch_groups(config["stats_groups"], ctx)}

    def rsd_term(self, student, teacher, *, train: bool) -> Term:
        student_vector, teacher_vector = (
            (student.features["embedding"], teacher.features["embedding"])
            if self.target == "embedding" else (student.logits, teacher.logits))
        projected = AAD(self.hidden_dim, self.teacher_dim, name="aad")(
            student_vector.astype(jnp.float32), train=train)
        return Term(self.rsd_weight, losses.rsd_loss_grouped(
            projected, teacher_vector, self.num_groups, kappa=self.kappa,
            distance=self.distance, normalize=self.normalize))

    def distill_terms(self, student, teacher, batch, *, train: bool):
        del batch
        return {"rsd": self.rsd_term(student, teacher, train=train)}


@register_method("rsd_ofa")
class RSDWithOFABranches(RSD):
    """RSD on the embedding plus OFA-KD's exit branches, each against the teacher's logits:
    `CE + lambda * L_RSD + ofa_weight * sum_k OFA(branch_k)`. `eps` is the branches' gamma
    (per stage with `branch_eps`); there is no final-logit OFA term."""

    stages: tuple[int, ...] = (1, 2, 3, 4)
    eps: float = 1.0
    branch_eps: tuple[float, ...] = ()
    ofa_weight: float = 1.0
    temperature: float = 1.0
    branches: ofa.OFABranches = derived()
    branch_gammas: tuple[tuple[int, float], ...] = derived()

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        if config["target"] != "embedding":
            raise ConfigError("rsd_ofa distills the embedding: target must be 'embedding'")
        return {**super().derive(config, student, teacher, ctx),
                **ofa.derive_branches(config, student, teacher)}

    @nn.compact
    def __call__(self, student, teacher, batch, *, train: bool):
        branch_logits = self.branches(student.features["stages"], train=train)
        branches, parts = ofa.branch_losses(branch_logits, teacher.logits, batch["label"],
                                            self.branch_gammas, self.temperature)
        return {"ce": Term(1.0, self.supervised_loss(student.logits, batch["label"])),
                "rsd": self.rsd_term(student, teacher, train=train),
                "ofa": Term(self.ofa_weight, branches),
                **{name: Term(None, value) for name, value in parts.items()}}
