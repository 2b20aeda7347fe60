"""Feature regression loss used by FitNet."""

import jax.numpy as jnp

from jaxkd.losses._common import as_float32, check_same_shape, frozen_float32


def mse_loss(student, teacher):
    """Mean squared error over all elements between the aligned student and the teacher feature."""
    check_same_shape("mse_loss", student, teacher, "student feature",
                     "teacher feature (align the student to the teacher's shape first)")
    return jnp.mean(jnp.square(as_float32(student) - frozen_float32(teacher)))
