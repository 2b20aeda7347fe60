"""CoSS (Singh & Wang 2023): co-similarity plus space similarity of embeddings (unsupervised)."""

import jax.numpy as jnp

from jaxkd.losses._common import (as_float32, check_ndim, check_same_shape, frozen_float32,
                                  l2_normalize)


def _check_pair(name, student_embedding, teacher_embedding):
    check_ndim(name, student_embedding, 2, "student embedding [N, D]")
    check_same_shape(name, student_embedding, teacher_embedding, "student embedding",
                     "teacher embedding (a head must map D_s to D_t)")


def coss_loss(student_embedding, teacher_embedding, lambda_ss=1.0, student_temp=0.1,
              teacher_temp=0.07, co_weight=1.0):
    """co_weight * L_co + lambda_ss * L_ss on embeddings [N, D] (temperatures applied after
    normalising).

    L_co: minus the mean over examples of the row-normalised dot product (co-similarity);
    L_ss: minus the mean over feature dimensions of the column-normalised dot product (space
    similarity). No mean-centring. The official code's default lambda is 0.5; co_weight = 0
    leaves the space term alone (the paper's L_ss ablation).
    """
    _check_pair("coss_loss", student_embedding, teacher_embedding)
    a_s, a_t = as_float32(student_embedding), frozen_float32(teacher_embedding)
    scale = 1.0 / (student_temp * teacher_temp)
    co_similarity = jnp.sum(l2_normalize(a_s, 1) * l2_normalize(a_t, 1), axis=1)
    space_similarity = jnp.sum(l2_normalize(a_s, 0) * l2_normalize(a_t, 0), axis=0)
    return -scale * (co_weight * jnp.mean(co_similarity) +
                     lambda_ss * jnp.mean(space_similarity))


def space_similarity_loss(student_embedding, teacher_embedding):
    """CoSS's L_ss without temperatures: minus the mean over feature dimensions of the cosine
    between the student's and the teacher's column (one dimension over the batch)."""
    _check_pair("space_similarity_loss", student_embedding, teacher_embedding)
    a_s, a_t = as_float32(student_embedding), frozen_float32(teacher_embedding)
    return -jnp.mean(jnp.sum(l2_normalize(a_s, 0) * l2_normalize(a_t, 0), axis=0))
