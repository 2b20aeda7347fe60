"""Baselines on the relations between a batch's examples: similarity preserving (SP), RKD,
PKT and correlation congruence (CC), as CRD's code base (RepDistiller) trains them; RKD and CC
also as the OFA-KD code does (the same losses on the pre-logits embedding, its defaults being
RepDistiller's). Each is CE + weight * its loss, with `<name>_unsup` variants
(jaxkd.distill.feature).

Their batch statistics are per device in the original code: `stats_groups` (0 = one group
per device, 1 = the global batch, n = n contiguous groups) as RSD's. RepDistiller's CIFAR runs
used one GPU: its configs set stats_groups=1.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.distill.base import Term, batch_groups, derived
from jaxkd.distill.feature import FeatureMethod, paired_stage_count, register_feature_method
from jaxkd.models.layers import torch_linear_init


class _GroupedMethod(FeatureMethod):
    """A method with per-group batch statistics."""

    stats_groups: int = 0  # 0: one group per device
    num_groups: int = derived()

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        return {**super().derive(config, student, teacher, ctx),
                "num_groups": batch_groups(config["stats_groups"], ctx)}

    def grouped(self, name, loss_fn, *arrays):
        return losses.mean_over_groups(name, loss_fn, self.num_groups, *arrays)


def _embeddings(student, teacher):
    return (student.features["embedding"].astype(jnp.float32),
            teacher.features["embedding"])


@register_feature_method("sp")
class SimilarityPreserving(_GroupedMethod):
    """SP (Tung & Mori 2019) on each model's last stage feature (RepDistiller's feat[-2]):
    CE + sp_weight * losses.sp_loss; sp_weight 3000 as RepDistiller."""

    sp_weight: float = 3000.0

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        paired_stage_count(student, teacher)  # both have stage features
        return super().derive(config, student, teacher, ctx)

    def distill_terms(self, student, teacher, batch, *, train: bool):
        del batch, train
        return {"sp": Term(self.sp_weight, self.grouped(
            "sp_loss", losses.sp_loss, student.features["stages"][-1].astype(jnp.float32),
            teacher.features["stages"][-1]))}


@register_feature_method("rkd")
class RelationalKD(_GroupedMethod):
    """RKD (Park et al. 2019) on the pre-logits embeddings: CE + rkd_weight * (25 * distance +
    50 * angle), smooth L1 on mean-normalised pairwise distances and on triplet angles;
    rkd_weight 1 (RepDistiller's beta, the OFA code's kd_loss_weight)."""

    rkd_weight: float = 1.0
    distance_weight: float = 25.0
    angle_weight: float = 50.0
    squared: bool = False
    eps: float = 1e-12

    def distill_terms(self, student, teacher, batch, *, train: bool):
        del batch, train
        e_s, e_t = _embeddings(student, teacher)
        distance = self.grouped("rkd_distance_loss", functools.partial(
            losses.rkd_distance_loss, squared=self.squared, eps=self.eps), e_s, e_t)
        angle = self.grouped("rkd_angle_loss", losses.rkd_angle_loss, e_s, e_t)
        return {"rkd": Term(self.rkd_weight,
                            self.distance_weight * distance + self.angle_weight * angle),
                "rkd_distance": Term(None, distance), "rkd_angle": Term(None, angle)}


@register_feature_method("pkt")
class ProbabilisticKT(_GroupedMethod):
    """PKT (Passalis & Tefas 2018) on the pre-logits embeddings: CE + pkt_weight *
    losses.pkt_loss; pkt_weight 30000 as RepDistiller."""

    pkt_weight: float = 30000.0

    def distill_terms(self, student, teacher, batch, *, train: bool):
        del batch, train
        return {"pkt": Term(self.pkt_weight, self.grouped("pkt_loss", losses.pkt_loss,
                                                          *_embeddings(student, teacher)))}


class LinearEmbed(nn.Module):
    """Linear(D, feat_dim) with PyTorch's default init (CC's embed_s / embed_t)."""

    feat_dim: int

    @nn.compact
    def __call__(self, x):
        kernel_init, bias_init = torch_linear_init(x.shape[-1])
        return nn.Dense(self.feat_dim, kernel_init=kernel_init, bias_init=bias_init,
                        name="linear")(x.astype(jnp.float32))


@register_feature_method("cc")
class CorrelationCongruence(_GroupedMethod):
    """CC (Peng et al. 2019) as the code CRD's authors received, also the OFA-KD code's: both
    embeddings through their own trainable Linear to feat_dim = 128 (the teacher's embedding
    is frozen, its Linear is not), then CE + cc_weight * losses.cc_loss; cc_weight 0.02
    (RepDistiller's beta, the OFA code's correlation_scale with kd_loss_weight 1)."""

    cc_weight: float = 0.02
    feat_dim: int = 128

    def distill_terms(self, student, teacher, batch, *, train: bool):
        del batch, train
        e_s, e_t = _embeddings(student, teacher)
        f_s = LinearEmbed(self.feat_dim, name="embed_student")(e_s)
        f_t = LinearEmbed(self.feat_dim, name="embed_teacher")(jax.lax.stop_gradient(e_t))
        return {"cc": Term(self.cc_weight, self.grouped("cc_loss", losses.cc_loss, f_s, f_t))}
