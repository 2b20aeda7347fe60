"""Decoupled knowledge distillation (Zhao et al. 2022), as mdistiller computes it."""

import jax
import jax.numpy as jnp

from jaxkd.losses._common import as_float32, check_logits_pair, frozen_float32
from jaxkd.losses.cross_entropy import checked_class_labels


def _split_log_probs(scaled_logits, target_mask):
    """Log-probabilities of the (target, rest) split and the log-softmax over non-targets.

    mdistiller takes log of the summed softmax (which is -inf once a class saturates) and
    masks the target with `- 1000 * mask`, which does not mask logits of magnitude >= 1e3.
    Here the same quantities come from log-sum-exps with the target truly excluded; the
    non-target log-softmax is set to 0 at the target position, where callers mask it out.
    """
    lse_all = jax.nn.logsumexp(scaled_logits, axis=-1)
    max_rest = jnp.max(jnp.where(target_mask, -jnp.inf, scaled_logits), axis=-1, keepdims=True)
    shifted_rest = jnp.where(target_mask, -jnp.inf, scaled_logits - max_rest)
    lse_rest = max_rest[:, 0] + jnp.log(jnp.sum(jnp.exp(shifted_rest), axis=-1))
    log_p_target = jnp.sum(jnp.where(target_mask, scaled_logits, 0.0), axis=-1) - lse_all
    log_p_binary = jnp.stack([log_p_target, lse_rest - lse_all], axis=-1)
    log_q_rest = jnp.where(target_mask, 0.0, scaled_logits - lse_rest[:, None])
    return log_p_binary, log_q_rest


def dkd_loss(student_logits, teacher_logits, labels, alpha=1.0, beta=8.0, temperature=4.0):
    """alpha * TCKD + beta * NCKD, each T^2 * batch-mean KL(teacher || student).

    TCKD is the KL of the binary (target, rest) distributions, NCKD the KL of the
    distributions over the non-target classes. Defaults are mdistiller's CIFAR ones; the OFA
    code uses alpha=1, beta=2, T=1. Labels are integer [B] or soft [B, C] (argmax class).
    The 20-epoch linear warmup of mdistiller is a schedule on the weight, left to the caller.
    """
    check_logits_pair("dkd_loss", student_logits, teacher_logits)
    batch, num_classes = jnp.shape(student_logits)
    labels = checked_class_labels("dkd_loss", labels, batch, num_classes)
    target_mask = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)
    log_b_s, log_q_s = _split_log_probs(as_float32(student_logits) / temperature, target_mask)
    log_b_t, log_q_t = _split_log_probs(frozen_float32(teacher_logits) / temperature, target_mask)
    tckd = jnp.sum(jnp.exp(log_b_t) * (log_b_t - log_b_s), axis=-1)
    q_t = jnp.where(target_mask, 0.0, jnp.exp(log_q_t))
    nckd = jnp.sum(q_t * (log_q_t - log_q_s), axis=-1)
    return temperature ** 2 * jnp.mean(alpha * tckd + beta * nckd)
