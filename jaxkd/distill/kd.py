"""Hinton KD: CE + kd_weight * T^2 KL(teacher || student) on the final logits."""

import flax.linen as nn

from jaxkd import losses
from jaxkd.distill.base import register_method, supervised_loss


class KD(nn.Module):
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    label_smoothing: float = 0.0

    def __call__(self, student_out, teacher_out, batch, *, train: bool):
        del train
        ce = supervised_loss(student_out[0], batch["label"], self.label_smoothing)
        kd = losses.kd_loss(student_out[0], teacher_out[0], temperature=self.temperature)
        return self.ce_weight * ce + self.kd_weight * kd, {"ce": ce, "kd": kd}


@register_method("kd", defaults={"temperature": 1.0, "kd_weight": 1.0, "ce_weight": 1.0})
def build(config, student, teacher, ctx):
    del student, teacher
    return KD(temperature=config.temperature, kd_weight=config.kd_weight,
              ce_weight=config.ce_weight, label_smoothing=ctx.label_smoothing)
