"""Decoupled KD: CE + weight(step) * kd_weight * (alpha * TCKD + beta * NCKD).

Defaults are the OFA code's (alpha 1, beta 2, T 1); mdistiller's CIFAR setting is alpha 1,
beta 8, T 4 with a 20-epoch linear warmup of the DKD weight, `min(epoch / 20, 1)`. Here the
warmup counts steps: with `warmup_steps` = n > 0 the weight of training step t (1-based) is
`min(t / n, 1)`; the step count is a non-trainable collection, checkpointed with the run.
The weight in force is logged as `dkd_weight`.
"""

import jax.numpy as jnp

from jaxkd import losses
from jaxkd.distill.base import Method, Term, register_method


@register_method("dkd")
class DKD(Method):
    alpha: float = 1.0
    beta: float = 2.0
    temperature: float = 1.0
    warmup_steps: int = 0
    kd_weight: float = 1.0

    def setup(self):
        if self.warmup_steps > 0:
            self.steps = self.variable("counters", "steps", lambda: jnp.zeros((), jnp.int32))

    def __call__(self, student, teacher, batch, *, train: bool):
        logits, labels = student.logits, batch["label"]
        weight = jnp.float32(self.kd_weight)
        if self.warmup_steps > 0:
            step = self.steps.value + 1  # the step being taken
            weight = weight * jnp.minimum(step / self.warmup_steps, 1.0).astype(jnp.float32)
            if train:
                self.steps.value = step
        dkd = losses.dkd_loss(logits, teacher.logits, labels, alpha=self.alpha, beta=self.beta,
                              temperature=self.temperature)
        return {"ce": Term(1.0, self.supervised_loss(logits, labels)),
                "dkd": Term(weight, dkd),
                "dkd_weight": Term(None, weight)}
