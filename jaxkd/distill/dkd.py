"""Decoupled KD: CE + weight(step) * kd_weight * (alpha * TCKD + beta * NCKD).

Defaults are the OFA code's (alpha 1, beta 2, T 1); mdistiller's CIFAR setting is alpha 1,
beta 8, T 4 with a 20-epoch linear warmup of the DKD weight, `min(epoch / 20, 1)`. Here the
warmup counts steps: with `warmup_steps` = n > 0 the weight of training step t (1-based) is
`min(t / n, 1)`; the step count is a non-trainable collection, checkpointed with the run.
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.distill.base import register_method, supervised_loss


class DKD(nn.Module):
    alpha: float = 1.0
    beta: float = 2.0
    temperature: float = 1.0
    warmup_steps: int = 0
    kd_weight: float = 1.0
    label_smoothing: float = 0.0

    @nn.compact
    def __call__(self, student_out, teacher_out, batch, *, train: bool):
        logits, labels = student_out[0], batch["label"]
        weight = jnp.float32(self.kd_weight)
        if self.warmup_steps > 0:
            steps = self.variable("counters", "steps", lambda: jnp.zeros((), jnp.int32))
            step = steps.value + 1  # the step being taken
            weight = weight * jnp.minimum(step / self.warmup_steps, 1.0).astype(jnp.float32)
            if train:
                steps.value = step
        ce = supervised_loss(logits, labels, self.label_smoothing)
        dkd = losses.dkd_loss(logits, teacher_out[0], labels, alpha=self.alpha, beta=self.beta,
                              temperature=self.temperature)
        return ce + weight * dkd, {"ce": ce, "dkd": dkd, "dkd_weight": weight}


@register_method("dkd", defaults={"alpha": 1.0, "beta": 2.0, "temperature": 1.0,
                                  "warmup_steps": 0, "kd_weight": 1.0})
def build(config, student, teacher, ctx):
    del student, teacher
    return DKD(alpha=config.alpha, beta=config.beta, temperature=config.temperature,
               warmup_steps=config.warmup_steps, kd_weight=config.kd_weight,
               label_smoothing=ctx.label_smoothing)
