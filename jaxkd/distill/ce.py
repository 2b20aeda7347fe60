"""Supervised training without a teacher: from-scratch baselines and teacher training."""

import flax.linen as nn

from jaxkd.distill.base import register_method, supervised_loss


class CrossEntropy(nn.Module):
    label_smoothing: float = 0.0

    def __call__(self, student_out, teacher_out, batch, *, train: bool):
        del teacher_out, train
        ce = supervised_loss(student_out[0], batch["label"], self.label_smoothing)
        return ce, {"ce": ce}


@register_method("ce", uses_teacher=False)
def build(config, student, teacher, ctx):
    del config, student, teacher
    return CrossEntropy(label_smoothing=ctx.label_smoothing)
