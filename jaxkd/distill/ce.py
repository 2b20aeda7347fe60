"""Supervised training without a teacher: from-scratch baselines and teacher training."""

from jaxkd.distill.base import Method, Term, register_method


@register_method("ce", teacher="none")
class CrossEntropy(Method):
    def __call__(self, student, teacher, batch, *, train: bool):
        del teacher, train
        return {"ce": Term(1.0, self.supervised_loss(student.logits, batch["label"]))}
