"""Helpers shared by the losses: float32 casting, shape checks and NaN-free norms."""

import jax
import jax.numpy as jnp


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
