"""Helpers shared by the losses: float32 casting, shape checks, NaN-free norms, adaptive
pooling and per-group batch statistics."""

import jax
import jax.numpy as jnp
import numpy as np

_NORM_EPS = 1e-12


def as_float32(x):
    """Cast to float32 so bf16 training still computes the loss in full precision."""
    return jnp.asarray(x).astype(jnp.float32)


def frozen_float32(x):
    """Cast to float32 and cut the gradient: teachers are frozen in every method."""
    return jax.lax.stop_gradient(as_float32(x))


def safe_sqrt(x):
    """sqrt whose gradient is 0 (not inf, hence NaN downstream) where x == 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def check_same_shape(name, student, teacher, student_name="student", teacher_name="teacher"):
    """Raise a ValueError naming the loss when student and teacher shapes differ."""
    if jnp.shape(student) != jnp.shape(teacher):
        raise ValueError(f"{name}: {student_name} shape {jnp.shape(student)} != "
                         f"{teacher_name} shape {jnp.shape(teacher)}")


def check_ndim(name, array, ndim, what):
    """Raise a ValueError when `array` is not `ndim`-dimensional."""
    if jnp.ndim(array) != ndim:
        raise ValueError(f"{name}: expected {what} with {ndim} dims, got shape {jnp.shape(array)}")


def check_logits_pair(name, student_logits, teacher_logits):
    """Both logits must be [B, C] of the same shape."""
    check_ndim(name, student_logits, 2, "student logits [B, C]")
    check_same_shape(name, student_logits, teacher_logits, "student logits", "teacher logits")


def l2_normalize(x, axis):
    """x / max(||x||, 1e-12) along `axis`, as torch.nn.functional.normalize (NaN-free
    gradient at 0)."""
    norm = safe_sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, _NORM_EPS)


def _adaptive_pool_matrix(in_size, out_size):
    """[out, in] averaging matrix; bins [floor(i*n/o), ceil((i+1)*n/o)) as torch's adaptive pool."""
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return jnp.asarray(matrix)


def adaptive_avg_pool(feature, size):
    """torch's adaptive_avg_pool2d of an NHWC map to size x size."""
    _, height, width, _ = feature.shape
    return jnp.einsum("ih,jw,bhwc->bijc", _adaptive_pool_matrix(height, size),
                      _adaptive_pool_matrix(width, size), feature,
                      precision=jax.lax.Precision.HIGHEST)


def pool_to_smaller(f_s, f_t):
    """The larger of two NHWC maps adaptively pooled to the other's height (square), as
    RepDistiller's AT, FT, NST and VID match spatial sizes; equal sizes pass through."""
    s_height, t_height = f_s.shape[1], f_t.shape[1]
    if s_height > t_height:
        return adaptive_avg_pool(f_s, t_height), f_t
    if s_height < t_height:
        return f_s, adaptive_avg_pool(f_t, s_height)
    return f_s, f_t


def mean_over_groups(name, loss_fn, num_groups, *arrays):
    """Mean of loss_fn over `num_groups` contiguous equal slices of the batch (axis 0) of every
    array: batch statistics per device when the groups are the devices' shares."""
    batch = jnp.shape(arrays[0])[0]
    if num_groups < 1 or batch % num_groups:
        raise ValueError(f"{name}: batch {batch} is not divisible into num_groups={num_groups} "
                         "equal groups")
    if num_groups == 1:
        return loss_fn(*arrays)
    grouped = [jnp.reshape(a, (num_groups, batch // num_groups, *jnp.shape(a)[1:]))
               for a in arrays]
    return jnp.mean(jax.vmap(loss_fn)(*grouped))
