"""OFA-KD's modified KD loss with the target-class enhancement exponent (`ofa_eps`)."""

import jax
import jax.numpy as jnp

from jaxkd.losses._common import as_float32, check_logits_pair, frozen_float32
from jaxkd.losses.cross_entropy import checked_class_labels


def ofa_loss(student_logits, teacher_logits, labels, eps=1.0, temperature=1.0):
    """-mean_b sum_c ((p_t + m)^eps - m) * log p_s, with m the one-hot label and no T^2.

    Target-class weight (1 + p_t)^eps - 1, non-target p_t^eps. Labels are integer [B] or
    soft [B, C] (mixup/cutmix) whose argmax is the class. Uses log_softmax where the official
    code takes log(softmax), which is -inf (then NaN) once a student probability underflows.
    """
    check_logits_pair("ofa_loss", student_logits, teacher_logits)
    batch, num_classes = jnp.shape(student_logits)
    labels = checked_class_labels("ofa_loss", labels, batch, num_classes)
    target_mask = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    log_p_s = jax.nn.log_softmax(as_float32(student_logits) / temperature, axis=-1)
    p_t = jax.nn.softmax(frozen_float32(teacher_logits) / temperature, axis=-1)
    weights = (p_t + target_mask) ** eps - target_mask
    return jnp.mean(-jnp.sum(weights * log_p_s, axis=-1))
