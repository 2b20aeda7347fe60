"""CoSS (Singh & Wang 2023): co-similarity plus space similarity of embeddings (unsupervised)."""

import jax.numpy as jnp

from jaxkd.losses._common import as_float32, check_ndim, check_same_shape, frozen_float32, safe_sqrt

_NORM_EPS = 1e-12


def _l2_normalise(x, axis):
    """x / max(||x||, 1e-12) along `axis`, as torch.nn.functional.normalize."""
    norm = safe_sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, _NORM_EPS)


def coss_loss(student_embedding, teacher_embedding, lambda_ss=1.0, student_temp=0.1,
              teacher_temp=0.07):
    """L_co + lambda_ss * L_ss on embeddings [N, D] (temperatures applied after normalising).

    L_co: minus the mean over examples of the row-normalised dot product (co-similarity);
    L_ss: minus the mean over feature dimensions of the column-normalised dot product (space
    similarity). No mean-centring. The official code's default lambda is 0.5.
    """
    check_ndim("coss_loss", student_embedding, 2, "student embedding [N, D]")
    check_same_shape("coss_loss", student_embedding, teacher_embedding, "student embedding",
                     "teacher embedding (a head must map D_s to D_t)")
    a_s, a_t = as_float32(student_embedding), frozen_float32(teacher_embedding)
    scale = 1.0 / (student_temp * teacher_temp)
    co_similarity = jnp.sum(_l2_normalise(a_s, 1) * _l2_normalise(a_t, 1), axis=1)
    space_similarity = jnp.sum(_l2_normalise(a_s, 0) * _l2_normalise(a_t, 0), axis=0)
    return -scale * (jnp.mean(co_similarity) + lambda_ss * jnp.mean(space_similarity))
