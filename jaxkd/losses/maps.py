"""Losses on stage feature maps (NHWC), as CRD's code base (RepDistiller) computes them.

Maps of different heights are first matched by adaptive average pooling of the larger one
(`pool_to_smaller`), as RepDistiller does for AT, FT, NST and VID; channel counts may differ.
"""

import jax
import jax.numpy as jnp

from jaxkd.losses._common import (as_float32, check_ndim, frozen_float32, l2_normalize,
                                  pool_to_smaller)


def _check_maps(name, student_map, teacher_map):
    check_ndim(name, student_map, 4, "student map [B, H, W, C]")
    check_ndim(name, teacher_map, 4, "teacher map [B, H, W, C]")
    if jnp.shape(student_map)[0] != jnp.shape(teacher_map)[0]:
        raise ValueError(f"{name}: student batch {jnp.shape(student_map)[0]} != teacher batch "
                         f"{jnp.shape(teacher_map)[0]}")


def spatial_attention(feature_map, p=2):
    """[B, H*W]: the mean over channels of f^p (not |f|^p, as RepDistiller's f.pow(p)), each
    example's map L2-normalised (torch's F.normalize, eps 1e-12)."""
    attention = jnp.mean(feature_map ** p, axis=-1)
    return l2_normalize(attention.reshape(attention.shape[0], -1), 1)


def at_loss(student_map, teacher_map, p=2):
    """Attention transfer (Zagoruyko & Komodakis 2017) of one stage: the mean over batch and
    positions of (a_s - a_t)^2, a = spatial_attention(map, p). The stage weight (1000 in
    RepDistiller's scripts) is the caller's."""
    _check_maps("at_loss", student_map, teacher_map)
    f_s, f_t = pool_to_smaller(as_float32(student_map), frozen_float32(teacher_map))
    return jnp.mean(jnp.square(spatial_attention(f_s, p) - spatial_attention(f_t, p)))


def factor_transfer_loss(student_factor, teacher_factor, p1=2, p2=1):
    """Factor transfer (Kim et al. 2018) between the translator's and the paraphraser's
    factors: mean |f_s - f_t|^p2 (p2 = 1: mean absolute difference) of their
    spatial_attention(., p1) after pooling to the smaller map."""
    _check_maps("factor_transfer_loss", student_factor, teacher_factor)
    f_s, f_t = pool_to_smaller(as_float32(student_factor), frozen_float32(teacher_factor))
    difference = spatial_attention(f_s, p1) - spatial_attention(f_t, p1)
    if p2 == 1:
        return jnp.mean(jnp.abs(difference))
    return jnp.mean(difference ** p2)


def _channel_responses(feature_map):
    """[B, C, H*W] with each channel's spatial response L2-normalised."""
    batch, height, width, channels = feature_map.shape
    responses = jnp.transpose(feature_map.reshape(batch, height * width, channels), (0, 2, 1))
    return l2_normalize(responses, 2)


def _mean_polynomial_kernel(a, b):
    """mean over the batch and every channel pair (i, j) of (<a_i, b_j>)^2."""
    gram = jnp.einsum("bik,bjk->bij", a, b, precision=jax.lax.Precision.HIGHEST)
    return jnp.mean(jnp.square(gram))


def nst_loss(student_map, teacher_map):
    """Neuron selectivity transfer (Huang & Wang 2017): the squared MMD with the polynomial
    kernel k(x, y) = (x.y)^2 between the channels' normalised spatial responses,
    mean k(t, t) + mean k(s, s) - 2 mean k(s, t) (RepDistiller's full_loss)."""
    _check_maps("nst_loss", student_map, teacher_map)
    f_s, f_t = pool_to_smaller(as_float32(student_map), frozen_float32(teacher_map))
    r_s, r_t = _channel_responses(f_s), _channel_responses(f_t)
    return (_mean_polynomial_kernel(r_t, r_t) + _mean_polynomial_kernel(r_s, r_s)
            - 2.0 * _mean_polynomial_kernel(r_s, r_t))


VID_EPS = 1e-5


def vid_loss(predicted_mean, teacher_map, log_scale, eps=VID_EPS):
    """Variational information distillation (Ahn et al. 2019): the mean over all elements of
    the Gaussian negative log-likelihood 0.5 * ((mu - t)^2 / var + log var) of the teacher map
    under the regressor's mean `predicted_mean` (same shape) and the per-channel variance
    var = softplus(log_scale) + eps. log(1 + exp(x)) is computed stably (softplus)."""
    if jnp.shape(predicted_mean) != jnp.shape(teacher_map):
        raise ValueError(f"vid_loss: predicted mean shape {jnp.shape(predicted_mean)} != teacher "
                         f"map shape {jnp.shape(teacher_map)} (pool and regress first)")
    if jnp.shape(log_scale) != jnp.shape(teacher_map)[-1:]:
        raise ValueError(f"vid_loss: log_scale shape {jnp.shape(log_scale)} is not the teacher's "
                         f"channels {jnp.shape(teacher_map)[-1:]}")
    variance = jax.nn.softplus(as_float32(log_scale)) + eps
    difference = as_float32(predicted_mean) - frozen_float32(teacher_map)
    return jnp.mean(0.5 * (jnp.square(difference) / variance + jnp.log(variance)))
