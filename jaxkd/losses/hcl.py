"""PAT's hierarchical context loss (HCL): MSE at full resolution and on pooled pyramids."""

import jax.numpy as jnp

from jaxkd.losses._common import adaptive_avg_pool, as_float32, check_same_shape

_POOL_SIZES = (4, 2, 1)


def hcl_loss(student_feature, teacher_feature):
    """[MSE + sum_l w_l MSE(pool_l)] / (1 + sum_l w_l) for one NHWC stage feature pair.

    Levels l = 4, 2, 1 (adaptive average pools to l x l); a level is skipped when l >= H, and,
    as in the official code, the weight halves per level actually used: 0.5, 0.25, 0.125 when
    H > 4; with H in 3..4 the 2x2 and 1x1 levels get 0.5 and 0.25; with H = 2 the 1x1 level
    gets 0.5; with H = 1 it is the plain MSE.
    A token feature [B, L, C] is treated as-is: plain MSE (the official code reshapes square
    token grids to maps; reshape to [B, h, w, C] before calling to get that).
    The teacher feature is NOT under stop_gradient: in PAT it is the prompted teacher's
    feature, and HCL is what trains the prompts. Stop it in the caller where it must be frozen.
    """
    check_same_shape("hcl_loss", student_feature, teacher_feature, "student feature",
                     "teacher feature")
    if jnp.ndim(student_feature) not in (3, 4):
        raise ValueError(f"hcl_loss: expected NHWC [B, H, W, C] or tokens [B, L, C], got shape "
                         f"{jnp.shape(student_feature)}")
    f_s, f_t = as_float32(student_feature), as_float32(teacher_feature)
    loss = jnp.mean(jnp.square(f_s - f_t))
    if f_s.ndim == 3:
        return loss
    weight, total_weight = 1.0, 1.0
    for size in _POOL_SIZES:
        if size >= f_s.shape[1]:
            continue
        weight /= 2.0
        pooled_diff = adaptive_avg_pool(f_s, size) - adaptive_avg_pool(f_t, size)
        loss = loss + weight * jnp.mean(jnp.square(pooled_diff))
        total_weight += weight
    return loss / total_weight
