"""DIST (Huang et al. 2022): CE + kd_weight * DIST(student logits, teacher logits).

DIST = tau^2 * (beta * (1 - inter-class Pearson) + gamma * (1 - intra-class Pearson)) on the
softmax(z / tau) probabilities; defaults beta = gamma = tau = 1 as the OFA code.
"""

import flax.linen as nn

from jaxkd import losses
from jaxkd.distill.base import register_method, supervised_loss


class DIST(nn.Module):
    beta: float = 1.0
    gamma: float = 1.0
    temperature: float = 1.0
    kd_weight: float = 1.0
    label_smoothing: float = 0.0

    def __call__(self, student_out, teacher_out, batch, *, train: bool):
        del train
        ce = supervised_loss(student_out[0], batch["label"], self.label_smoothing)
        dist = losses.dist_loss(student_out[0], teacher_out[0], beta=self.beta, gamma=self.gamma,
                                temperature=self.temperature)
        return ce + self.kd_weight * dist, {"ce": ce, "dist": dist}


@register_method("dist", defaults={"beta": 1.0, "gamma": 1.0, "temperature": 1.0,
                                   "kd_weight": 1.0})
def build(config, student, teacher, ctx):
    del student, teacher
    return DIST(beta=config.beta, gamma=config.gamma, temperature=config.temperature,
                kd_weight=config.kd_weight, label_smoothing=ctx.label_smoothing)
