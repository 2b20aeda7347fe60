"""SRRL (Yang et al. 2021): softmax regression representation learning.

The student's pre-logits embedding goes through a connector (1x1 conv = Linear(D_s, D_t)
without bias, BN, ReLU; PyTorch's default init), then
`CE + feature_weight * MSE(connector, teacher embedding)
     + logits_weight * MSE(teacher_head(connector), teacher logits)`,
the teacher's classifier frozen (TeacherView.head; registered with teacher_head=True). This is
the CIFAR form CRD-style code bases run (SimKD's, used for CoSS's Table 1): the connector on
the pooled embedding, both weights 1. The official ImageNet script puts the connector on the
last stage map before pooling and adds a mean-matching term whose call is broken as
published; the pooled form is what runs. Unsupervised (`srrl_unsup`): the feature term only,
no head is involved.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.distill.base import Term, derived
from jaxkd.distill.feature import FeatureMethod, register_feature_method
from jaxkd.errors import ConfigError
from jaxkd.models.layers import batch_norm, torch_linear_init


class Connector(nn.Module):
    """Linear(D_s, D_t, no bias) -> BN -> ReLU: the 1x1 conv, BatchNorm2d and ReLU of the
    original on a [B, D, 1, 1] map."""

    out_dim: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        kernel_init, _ = torch_linear_init(x.shape[-1])
        x = nn.Dense(self.out_dim, use_bias=False, kernel_init=kernel_init, name="proj")(x)
        return nn.relu(batch_norm(train, name="bn")(x))


@register_feature_method("srrl", teacher_head=True)
class SRRL(FeatureMethod):
    feature_weight: float = 1.0
    logits_weight: float = 1.0
    teacher_dim: int = derived()

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        return {**super().derive(config, student, teacher, ctx),
                "teacher_dim": teacher.embed_dim}

    def distill_terms(self, student, teacher, batch, *, train: bool):
        del batch
        connected = Connector(self.teacher_dim, name="connector")(
            student.features["embedding"].astype(jnp.float32), train=train)
        terms = {"srrl_feature": Term(self.feature_weight, losses.mse_loss(
            connected, teacher.features["embedding"]))}
        if not self.unsupervised:
            if teacher.head is None:
                raise ConfigError("SRRL regresses through the teacher's classifier: the "
                                  "trainer must pass TeacherView.head (teacher_head=True)")
            terms["srrl_logits"] = Term(self.logits_weight, losses.mse_loss(
                teacher.head(connected), teacher.logits))
        return terms
