"""DIST (Huang et al. 2022): CE + kd_weight * DIST(student logits, teacher logits).

DIST = tau^2 * (beta * (1 - inter-class Pearson) + gamma * (1 - intra-class Pearson)) on the
softmax(z / tau) probabilities; defaults beta = gamma = tau = 1 as the OFA code.
"""

from jaxkd import losses
from jaxkd.distill.base import Method, Term, register_method


@register_method("dist")
class DIST(Method):
    beta: float = 1.0
    gamma: float = 1.0
    temperature: float = 1.0
    kd_weight: float = 1.0

    def __call__(self, student, teacher, batch, *, train: bool):
        del train
        return {
            "ce": Term(1.0, self.supervised_loss(student.logits, batch["label"])),
            "dist": Term(self.kd_weight, losses.dist_loss(
                student.logits, teacher.logits, beta=self.beta, gamma=self.gamma,
                temperature=self.temperature)),
        }
