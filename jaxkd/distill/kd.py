"""Hinton KD: CE + kd_weight * T^2 KL(teacher || student) on the final logits."""

from jaxkd import losses
from jaxkd.distill.base import Method, Term, register_method


@register_method("kd")
class KD(Method):
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0

    def __call__(self, student, teacher, batch, *, train: bool):
        del train
        return {
            "ce": Term(self.ce_weight, self.supervised_loss(student.logits, batch["label"])),
            "kd": Term(self.kd_weight, losses.kd_loss(student.logits, teacher.logits,
                                                      temperature=self.temperature)),
        }
