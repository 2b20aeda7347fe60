"""Redundancy suppression distillation (RSD) on pre-logits embeddings."""

import functools

import jax
import jax.numpy as jnp

from jaxkd.losses._common import (as_float32, check_ndim, frozen_float32, mean_over_groups,
                                   safe_sqrt)

_STD_EPS = 1e-5


def _standardise(embedding):
    """Per-dimension batch standardisation with the biased std, as the official code."""
    centred = embedding - jnp.mean(embedding, axis=0)
    std = safe_sqrt(jnp.mean(centred * centred, axis=0))
    return centred / (std + _STD_EPS)


def _huber(x):
    """Huber / smooth-L1 with delta 1: 0.5 x^2 for |x| <= 1, |x| - 0.5 beyond."""
    abs_x = jnp.abs(x)
    return jnp.where(abs_x <= 1.0, 0.5 * x * x, abs_x - 0.5)


_PENALTIES = {"mse": jnp.square, "huber": _huber}


def _check_embeddings(name, student_embedding, teacher_embedding):
    check_ndim(name, student_embedding, 2, "student embedding [B, D]")
    check_ndim(name, teacher_embedding, 2, "teacher embedding [B, D]")
    (batch_s, dim_s), (batch_t, dim_t) = jnp.shape(student_embedding), jnp.shape(teacher_embedding)
    if dim_s != dim_t:
        raise ValueError(f"{name}: student embedding dim D_s={dim_s} != teacher dim D_t={dim_t}; "
                         "the AAD projector must map D_s to D_t")
    if batch_s != batch_t:
        raise ValueError(f"{name}: student batch {batch_s} != teacher batch {batch_t}")


def rsd_loss(student_embedding, teacher_embedding, kappa=0.01, distance="mse", normalize=True):
    """sum_i pen(1 - C_ii) + kappa * sum_{i != j} pen(C_ij), C = zhat_t^T zhat_s / B.

    `student_embedding` is the AAD-projected student embedding [B, D_t]. `zhat` standardises
    each dimension over the batch (biased std + 1e-5); `normalize=False` skips it (then
    C = e_t^T e_s / B). `distance="mse"` is the square (the default and the official code);
    "huber" is the paper's ablation, the Huber / smooth-L1 loss with delta 1 in place of the
    square. The loss is a sum over the D_t x D_t matrix, not a mean.
    """
    _check_embeddings("rsd_loss", student_embedding, teacher_embedding)
    if distance not in _PENALTIES:
        raise ValueError(f"rsd_loss: distance must be one of {sorted(_PENALTIES)}, "
                         f"got {distance!r}")
    penalty = _PENALTIES[distance]
    e_s, e_t = as_float32(student_embedding), frozen_float32(teacher_embedding)
    if normalize:
        e_s, e_t = _standardise(e_s), _standardise(e_t)
    batch, dim = e_s.shape
    cross_corr = jnp.matmul(e_t.T, e_s, precision=jax.lax.Precision.HIGHEST) / batch
    on_diagonal = jnp.sum(penalty(1.0 - jnp.diagonal(cross_corr)))
    off_diagonal = jnp.sum(jnp.where(jnp.eye(dim, dtype=jnp.bool_), 0.0, penalty(cross_corr)))
    return on_diagonal + kappa * off_diagonal


def rsd_loss_grouped(student_embedding, teacher_embedding, num_groups, **kwargs):
    """Mean of rsd_loss over `num_groups` contiguous equal slices of the batch.

    With the global batch sharded contiguously over devices and num_groups = the device
    count, this reproduces the official per-device batch statistics (8 GPUs x 128).
    `kwargs` are rsd_loss's options.
    """
    _check_embeddings("rsd_loss_grouped", student_embedding, teacher_embedding)
    return mean_over_groups("rsd_loss_grouped", functools.partial(rsd_loss, **kwargs),
                            num_groups, student_embedding, teacher_embedding)
