"""DIST (Huang et al. 2022): inter- and intra-class Pearson correlation of probabilities."""

import jax
import jax.numpy as jnp

from jaxkd.losses._common import as_float32, check_logits_pair, frozen_float32, safe_sqrt

_EPS = 1e-8


def _mean_pearson(a, b, axis):
    """Mean over the other axis of the Pearson correlation along `axis` (eps as DIST's code)."""
    a = a - jnp.mean(a, axis=axis, keepdims=True)
    b = b - jnp.mean(b, axis=axis, keepdims=True)
    norm_a = safe_sqrt(jnp.sum(a * a, axis=axis))
    norm_b = safe_sqrt(jnp.sum(b * b, axis=axis))
    return jnp.mean(jnp.sum(a * b, axis=axis) / (norm_a * norm_b + _EPS))


def dist_loss(student_logits, teacher_logits, beta=1.0, gamma=1.0, temperature=1.0):
    """tau^2 * (beta * (1 - inter-class corr.) + gamma * (1 - intra-class corr.)).

    Inter-class: correlation of each example's probability vector (over classes); intra-class:
    correlation of each class's probability column (over the batch).
    """
    check_logits_pair("dist_loss", student_logits, teacher_logits)
    y_s = jax.nn.softmax(as_float32(student_logits) / temperature, axis=-1)
    y_t = jax.nn.softmax(frozen_float32(teacher_logits) / temperature, axis=-1)
    inter = 1.0 - _mean_pearson(y_s, y_t, axis=1)
    intra = 1.0 - _mean_pearson(y_s, y_t, axis=0)
    return temperature ** 2 * (beta * inter + gamma * intra)
