"""SEED (Fang et al. 2021): self-supervised distillation against a queue of teacher embeddings."""

import jax
import jax.numpy as jnp

from jaxkd.losses._common import (as_float32, check_ndim, check_same_shape, frozen_float32,
                                  l2_normalize)


def seed_loss(student_embedding, teacher_embedding, queue, student_temp=0.2, teacher_temp=1e-4):
    """Soft cross-entropy between the teacher's and the student's similarity distributions over
    [the teacher's own embedding, the queue's K embeddings], as the SEED code builds them.

    Both embeddings [B, D] are L2-normalised; the queue [K, D] holds (normalised) teacher
    embeddings of earlier batches. Student logits [s.t, s.Q] / student_temp; teacher targets
    softmax([t.t, t.Q] / teacher_temp); the loss is the batch mean of -sum targets * log_softmax.
    The teacher side and the queue are frozen.
    """
    check_ndim("seed_loss", student_embedding, 2, "student embedding [B, D]")
    check_same_shape("seed_loss", student_embedding, teacher_embedding, "student embedding",
                     "teacher embedding (a head must map D_s to D_t)")
    check_ndim("seed_loss", queue, 2, "queue [K, D]")
    if jnp.shape(queue)[1] != jnp.shape(teacher_embedding)[1]:
        raise ValueError(f"seed_loss: queue width {jnp.shape(queue)[1]} != embedding width "
                         f"{jnp.shape(teacher_embedding)[1]}")
    s = l2_normalize(as_float32(student_embedding), 1)
    t = l2_normalize(frozen_float32(teacher_embedding), 1)
    queue = frozen_float32(queue)

    def similarities(x):
        against_queue = jnp.matmul(x, queue.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([jnp.sum(x * t, axis=1, keepdims=True), against_queue], axis=1)

    targets = jax.nn.softmax(similarities(t) / teacher_temp, axis=1)
    log_probs = jax.nn.log_softmax(similarities(s) / student_temp, axis=1)
    return jnp.mean(-jnp.sum(targets * log_probs, axis=1))
