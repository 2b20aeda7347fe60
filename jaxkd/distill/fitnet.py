"""FitNet for any teacher/student pair: CE + weight * sum_k MSE(adapter_k(student_k), teacher_k).

The OFA code's FitNet (a 1x1 conv per stage) only handles CNN pairs. Here each stage feature,
NHWC map or token sequence, is first viewed as a square grid [B, g, g, C] (prefix tokens
dropped: they have no place on the grid, and a CNN student has nothing to align with a
teacher's class token). The trainable adapter then maps the student grid (g_s, C_s) to the
teacher's (g_t, C_t), all convolutions without bias:
  - g_s == g_t: 1x1 conv (the official FitNet regressor);
  - g_s = r * g_t: r x r conv with stride r (patch embedding / token merging);
  - g_t = r * g_s: 1x1 conv to r*r*C_t, each position unpatchified into an r x r patch.
The MSE compares the aligned student with the teacher's grid, mean over all elements; the
teacher side is frozen. Weight 0.1 by default (REFERENCE.md section 1).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.distill.base import Method, Term, derived, register_method
from jaxkd.distill.ofa import token_layout
from jaxkd.errors import ConfigError
from jaxkd.models.layers import KAIMING_FAN_OUT


def as_grid(feature, num_prefix: int):
    """[B, g, g, C] from an NHWC map or from tokens [B, P + g*g, C] (the P prefix dropped)."""
    if feature.ndim == 4:
        return feature
    batch, length, channels = feature.shape
    side = math.isqrt(length - num_prefix)
    return feature[:, num_prefix:].reshape(batch, side, side, channels)


def unpatchify(x, patch: int):
    """[B, g, g, p*p*C] -> [B, g*p, g*p, C]: channel block (i, j) goes to pixel (i, j) of the
    position's p x p patch (MAE's unpatchify order)."""
    batch, side, _, channels = x.shape
    out = channels // (patch * patch)
    x = x.reshape(batch, side, side, patch, patch, out).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, side * patch, side * patch, out)


class GridAdapter(nn.Module):
    """Maps a [B, g_s, g_s, C_s] student grid to the teacher's [B, g_t, g_t, C_t]."""

    teacher_grid: int
    teacher_channels: int

    @nn.compact
    def __call__(self, x):
        student_grid = x.shape[1]
        conv = {"use_bias": False, "padding": "VALID", "kernel_init": KAIMING_FAN_OUT}
        if student_grid >= self.teacher_grid:
            ratio = student_grid // self.teacher_grid
            return nn.Conv(self.teacher_channels, (ratio, ratio), strides=ratio, name="proj",
                           **conv)(x)
        ratio = self.teacher_grid // student_grid
        x = nn.Conv(ratio * ratio * self.teacher_channels, (1, 1), name="proj", **conv)(x)
        return unpatchify(x, ratio)


def stage_alignment(student_shape, teacher_shape) -> tuple[int, int, int, int]:
    """(student prefix, teacher prefix, teacher grid, teacher channels); ConfigError when
    the grids are not an integer ratio apart."""
    (s_prefix, s_grid), (t_prefix, t_grid) = token_layout(student_shape), token_layout(
        teacher_shape)
    big, small = max(s_grid, t_grid), min(s_grid, t_grid)
    if small < 1 or big % small:
        raise ConfigError(f"FitNet cannot align a {s_grid}x{s_grid} student grid "
                          f"{tuple(student_shape)} with a {t_grid}x{t_grid} teacher grid "
                          f"{tuple(teacher_shape)}: not an integer ratio")
    return s_prefix, t_prefix, t_grid, teacher_shape[-1]


@register_method("fitnet")
class FitNet(Method):
    stages: tuple[int, ...] = (1, 2, 3, 4)
    fitnet_weight: float = 0.1
    alignments: tuple[tuple[int, int, int, int], ...] = derived()  # stage_alignment() each

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        stages = tuple(int(s) for s in config["stages"])
        if not stages or len(set(stages)) != len(stages):
            raise ConfigError(f"FitNet stages must be distinct stage numbers, got {stages}")
        for spec in (student, teacher):
            count = len(spec.stage_shapes)
            if not set(stages) <= set(range(1, count + 1)):
                raise ConfigError(f"FitNet stages {stages}: model {spec.name!r} has {count} "
                                  f"stage features (stages 1-{count}); set method.stages to "
                                  "stages both models have")
        return {**super().derive(config, student, teacher, ctx),
                "alignments": tuple(stage_alignment(student.stage_shapes[s - 1],
                                                    teacher.stage_shapes[s - 1])
                                    for s in stages)}

    @nn.compact
    def __call__(self, student, teacher, batch, *, train: bool):
        del train
        parts = {}
        for stage, (s_prefix, t_prefix, t_grid, t_channels) in zip(self.stages,
                                                                   self.alignments):
            feature = as_grid(student.features["stages"][stage - 1], s_prefix)
            aligned = GridAdapter(t_grid, t_channels, name=f"stage{stage}")(
                feature.astype(jnp.float32))
            target = as_grid(teacher.features["stages"][stage - 1], t_prefix)
            parts[f"fitnet_stage{stage}"] = losses.mse_loss(aligned, target)
        return {"ce": Term(1.0, self.supervised_loss(student.logits, batch["label"])),
                "fitnet": Term(self.fitnet_weight, sum(parts.values())),
                **{name: Term(None, value) for name, value in parts.items()}}
