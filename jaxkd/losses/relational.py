"""Losses on the relations between a batch's examples, as CRD's code base (RepDistiller, also
the OFA-KD code for CC and RKD) computes them. Their batch statistics are per device in the
original code: callers reproduce that with `mean_over_groups`."""

import jax
import jax.numpy as jnp

from jaxkd.losses._common import (as_float32, check_ndim, frozen_float32, l2_normalize,
                                  safe_sqrt)


def _check_batches(name, student, teacher, min_batch=1):
    batch_s, batch_t = jnp.shape(student)[0], jnp.shape(teacher)[0]
    if batch_s != batch_t:
        raise ValueError(f"{name}: student batch {batch_s} != teacher batch {batch_t}")
    if batch_s < min_batch:
        raise ValueError(f"{name}: needs a batch of at least {min_batch}, got {batch_s}")


def _flat(x):
    return jnp.reshape(x, (jnp.shape(x)[0], -1))


def _row_normalised_gram(x):
    gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    return l2_normalize(gram, 1)


def sp_loss(student_feature, teacher_feature):
    """Similarity preserving (Tung & Mori 2019): ||G_t - G_s||_F^2 / B^2 with G = F F^T of the
    flattened features, each row L2-normalised (torch's F.normalize). Any feature shapes with
    the same batch."""
    _check_batches("sp_loss", student_feature, teacher_feature)
    g_s = _row_normalised_gram(_flat(as_float32(student_feature)))
    g_t = _row_normalised_gram(_flat(frozen_float32(teacher_feature)))
    return jnp.sum(jnp.square(g_t - g_s)) / jnp.shape(g_s)[0] ** 2


def smooth_l1(x, y):
    """torch's smooth_l1_loss (beta 1, mean): 0.5 d^2 for |d| < 1, |d| - 0.5 beyond."""
    d = jnp.abs(x - y)
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


RKD_EPS = 1e-12


def pairwise_distances(e, squared=False, eps=RKD_EPS):
    """[B, B] Euclidean distances from ||a||^2 + ||b||^2 - 2 a.b clamped at eps (squared or
    not), with an exact zero diagonal, as RKD's pdist."""
    square = jnp.sum(e * e, axis=1)
    prod = jnp.matmul(e, e.T, precision=jax.lax.Precision.HIGHEST)
    distances = jnp.maximum(square[:, None] + square[None, :] - 2.0 * prod, eps)
    if not squared:
        distances = jnp.sqrt(distances)
    return jnp.where(jnp.eye(e.shape[0], dtype=jnp.bool_), 0.0, distances)


def _normalised_distances(e, squared, eps):
    """pairwise_distances / their mean over the off-diagonal pairs (all > 0 after the clamp:
    the original's mean over d > 0)."""
    distances = pairwise_distances(e, squared, eps)
    batch = e.shape[0]
    return distances / (jnp.sum(distances) / (batch * (batch - 1)))


def rkd_distance_loss(student_embedding, teacher_embedding, squared=False, eps=RKD_EPS):
    """RKD-D (Park et al. 2019): smooth L1 between the mean-normalised pairwise distances."""
    _check_batches("rkd_distance_loss", student_embedding, teacher_embedding, 2)
    d_s = _normalised_distances(_flat(as_float32(student_embedding)), squared, eps)
    d_t = _normalised_distances(_flat(frozen_float32(teacher_embedding)), squared, eps)
    return smooth_l1(d_s, d_t)


def _angles(e):
    """[B, B, B]: cos of the angle at anchor i between e_j - e_i and e_k - e_i (0 where a
    difference is 0, as F.normalize gives)."""
    differences = l2_normalize(e[None, :, :] - e[:, None, :], 2)
    return jnp.einsum("ijd,ikd->ijk", differences, differences,
                      precision=jax.lax.Precision.HIGHEST)


def rkd_angle_loss(student_embedding, teacher_embedding):
    """RKD-A: smooth L1 between the triplets' angle cosines (B^3 of them)."""
    _check_batches("rkd_angle_loss", student_embedding, teacher_embedding, 2)
    return smooth_l1(_angles(_flat(as_float32(student_embedding))),
                     _angles(_flat(frozen_float32(teacher_embedding))))


def rkd_loss(student_embedding, teacher_embedding, distance_weight=25.0, angle_weight=50.0,
             squared=False, eps=RKD_EPS):
    """distance_weight * RKD-D + angle_weight * RKD-A (RepDistiller's and the OFA-KD code's
    weights 25 and 50)."""
    return (distance_weight * rkd_distance_loss(student_embedding, teacher_embedding, squared,
                                                eps)
            + angle_weight * rkd_angle_loss(student_embedding, teacher_embedding))


PKT_EPS = 1e-7


def _cosine_probabilities(x, eps):
    """Each row's (cosine + 1) / 2 similarities to the batch, normalised to sum to 1; rows
    divided by (norm + eps) as the original."""
    x = x / (safe_sqrt(jnp.sum(x * x, axis=1, keepdims=True)) + eps)
    similarity = (jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST) + 1.0) / 2.0
    return similarity / jnp.sum(similarity, axis=1, keepdims=True)


def pkt_loss(student_embedding, teacher_embedding, eps=PKT_EPS):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): the mean over all B^2 entries
    of p_t * log((p_t + eps) / (p_s + eps)) of the cosine-kernel conditional probabilities."""
    _check_batches("pkt_loss", student_embedding, teacher_embedding)
    p_s = _cosine_probabilities(_flat(as_float32(student_embedding)), eps)
    p_t = _cosine_probabilities(_flat(frozen_float32(teacher_embedding)), eps)
    return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))


def cc_loss(student_embedding, teacher_embedding):
    """Correlation congruence (Peng et al. 2019) as the code CRD's authors received (also the
    OFA-KD code's): with d_b = |f_s,b - f_t,b|, mean over consecutive pairs of sum_d
    d_b * d_(b+1). Both sides are trainable 128-d embeddings in CC, so neither is frozen here.
    """
    check_ndim("cc_loss", student_embedding, 2, "student embedding [B, D]")
    if jnp.shape(student_embedding) != jnp.shape(teacher_embedding):
        raise ValueError(f"cc_loss: student embedding {jnp.shape(student_embedding)} != teacher "
                         f"embedding {jnp.shape(teacher_embedding)} (embed both to one width)")
    _check_batches("cc_loss", student_embedding, teacher_embedding, 2)
    delta = jnp.abs(as_float32(student_embedding) - as_float32(teacher_embedding))
    return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))
