"""Hinton knowledge distillation."""

import jax
import jax.numpy as jnp

from jaxkd.losses._common import as_float32, check_logits_pair, frozen_float32


def kd_loss(student_logits, teacher_logits, temperature=1.0):
    """T^2 * batch-mean KL(p_t || p_s) with p = softmax(z / T).

    Computed from log_softmax on both sides, so it stays finite for logits of any magnitude
    (a teacher probability that underflows to 0 contributes 0).
    """
    check_logits_pair("kd_loss", student_logits, teacher_logits)
    log_p_s = jax.nn.log_softmax(as_float32(student_logits) / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(frozen_float32(teacher_logits) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return temperature ** 2 * jnp.mean(kl)
