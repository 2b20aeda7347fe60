"""PAT (Lin et al. 2025): region-aware attention (RAA) over the student's stages (four in the
paper; any number, equal to the teacher's), and adaptive feedback prompts (AFP) inside the
frozen teacher.

Total (all weights 1, REFERENCE.md section 1):

    CE + KD_T(student || teacher) + sum_stages HCL(aligned student, prompted teacher)
       + KD_1(prompted teacher || teacher)

* RAA: each student stage becomes 16 tokens of width 512 (nearest resize to 4 * ceil(H / 4),
  then a patch-embedding conv with kernel = stride = ceil(H / 4)); the 64 tokens go through one
  pre-LN self-attention layer (8 heads, sinusoidal position encoding added to q and k per
  token, no output projection) and are split back per stage. An aligner maps each stage's 16
  tokens to the teacher stage's shape: a CNN teacher gets a 4 x 4 grid, nearest upsampled,
  BN, 1 x 1 conv; a token teacher (ViT, MLPs, and Swin, whose stages the official code treats
  as tokens) gets BN over tokens + Linear(512 -> D_t), then BN over channels + Linear over
  tokens (16 -> L_t).
* AFP: a prompt block at the input of every teacher stage (the models' `pre_stage` hook). It
  fuses the stage input with the previous step's feedback (aligned student - prompted teacher
  of that stage, detached, resized to the input's grid, BN + 1 x 1 conv when the shapes
  differ),
  passes the result through a Pro-tuning prompt stack and returns `x + beta * prompt` with a
  learnable scalar beta starting at 0. The teacher's weights are frozen (stop_gradient, and
  not in the trained parameters); HCL's target, the prompted teacher's feature, is NOT
  detached, so HCL and the regulariser train the prompts.
* The feedback lives in the PER_EXAMPLE_COLLECTION (sharded over the batch like the batch it
  came from), so it is checkpointed and a resumed run continues with it. Before the first
  step there is none and the fusion is skipped, as in the official code.

The official code's bugs are not copied: the position encoding is indexed by token (the code
indexed it by batch element), a ViT's class token is kept out of the prompt (the code dropped
the last patch token instead), and the squeeze-and-excitation block scales its input by its
gate (the code returned the gate alone, which produced the published numbers:
`se_gate_only=True` reproduces it). A Swin teacher is prompted where the official code
prompts it, before the first block of each stage, after that stage's patch merging.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import losses
from jaxkd.distill.base import PER_EXAMPLE_COLLECTION, Method, Term, derived, register_method
from jaxkd.distill.ofa import token_layout
from jaxkd.errors import ConfigError
from jaxkd.models.layers import (KAIMING_FAN_OUT, TORCH_LN_EPS, TRUNC_NORMAL_02, batch_norm,
                                 conv2d, layer_norm)

RAA_GRID = 4  # each stage becomes RAA_GRID x RAA_GRID = 16 tokens
RAA_DIM = 512
RAA_HEADS = 8
SE_RATIO = 16
PROMPT_GROUPS = 4

# The official init_weights: kaiming normal (fan_out, relu) convs, BN (1, 0), trunc-normal
# (0.02) Linear weights with zero biases.


def _dense(features, name):
    return nn.Dense(features, kernel_init=TRUNC_NORMAL_02, bias_init=nn.initializers.zeros,
                    name=name)


def _conv(features, kernel, name, *, groups=1, use_bias=True):
    return conv2d(features, kernel, groups=groups, use_bias=use_bias,
                  kernel_init=KAIMING_FAN_OUT, name=name)


def split_grid(feature):
    """(prefix tokens or None, [B, h, w, C] grid) of an NHWC map or a [B, L, C] sequence whose
    square patch grid follows its prefix (class) tokens."""
    if feature.ndim == 4:
        return None, feature
    prefix, side = token_layout(feature.shape[1:])
    grid = feature[:, prefix:].reshape(feature.shape[0], side, side, feature.shape[-1])
    return feature[:, :prefix], grid


def join_grid(prefix, grid, like):
    """Back to the layout of `like` (split_grid's inverse)."""
    if like.ndim == 4:
        return grid
    tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
    return jnp.concatenate([prefix, tokens], axis=1) if prefix.shape[1] else tokens


def nearest_resize(grid, height: int, width: int):
    """torch.nn.functional.interpolate(mode='nearest') of an NHWC grid: source index
    floor(i * in / out)."""
    rows = (np.arange(height) * grid.shape[1]) // height
    cols = (np.arange(width) * grid.shape[2]) // width
    return grid[:, rows][:, :, cols]


def sinusoidal_encoding(length: int, dim: int) -> np.ndarray:
    """[length, dim]: sin on even channels, cos on odd ones, wavelengths 10000^(2i/dim)."""
    position = np.arange(length, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * -(math.log(10000.0) / dim))
    encoding = np.zeros((length, dim), np.float32)
    encoding[:, 0::2] = np.sin(position * div)
    encoding[:, 1::2] = np.cos(position * div)
    return encoding


class StageTokens(nn.Module):
    """A stage grid [B, H, W, C] -> [B, 16, dim] with one patch-embedding conv."""

    dim: int = RAA_DIM

    @nn.compact
    def __call__(self, grid):
        patch = math.ceil(grid.shape[1] / RAA_GRID)
        size = patch * RAA_GRID
        grid = nearest_resize(grid, size, size)
        x = nn.Conv(self.dim, (patch, patch), (patch, patch), padding="VALID",
                    kernel_init=KAIMING_FAN_OUT, name="proj")(grid)
        return x.reshape(x.shape[0], RAA_GRID * RAA_GRID, self.dim)


class RegionAwareAttention(nn.Module):
    """One self-attention layer over every stage's 16 tokens; returns them per stage."""

    num_stages: int = 4
    dim: int = RAA_DIM
    heads: int = RAA_HEADS

    @nn.compact
    def __call__(self, grids):
        tokens = jnp.concatenate([StageTokens(self.dim, name=f"stage_tokens_{i}")(g)
                                  for i, g in enumerate(grids)], axis=1)
        normed = layer_norm(TORCH_LN_EPS, None, "norm")(tokens)
        q = _dense(self.dim, "to_q")(normed)
        k, v = jnp.split(_dense(2 * self.dim, "to_kv")(normed), 2, axis=-1)
        position = jnp.asarray(sinusoidal_encoding(tokens.shape[1], self.dim))
        q, k = q + position, k + position
        batch, length, _ = q.shape
        heads = lambda t: t.reshape(batch, length, self.heads, -1)  # noqa: E731
        scale = (self.dim // self.heads) ** -0.5
        logits = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) * scale
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), heads(v))
        return jnp.split(out.reshape(batch, length, self.dim), self.num_stages, axis=1)


class MapAligner(nn.Module):
    """16 tokens -> a teacher map (H, W, C): 4 x 4 grid, nearest upsample, BN, 1 x 1 conv."""

    shape: tuple[int, int, int]

    @nn.compact
    def __call__(self, tokens, *, train: bool):
        grid = tokens.reshape(tokens.shape[0], RAA_GRID, RAA_GRID, tokens.shape[-1])
        grid = nearest_resize(grid, self.shape[0], self.shape[1])
        grid = batch_norm(train, name="bn")(grid)
        return _conv(self.shape[2], 1, "proj", use_bias=False)(grid)


class TokenAligner(nn.Module):
    """16 tokens -> teacher tokens (L, D): BN over tokens + Linear on channels, then BN over
    channels + Linear on tokens (the official ViT2ViTProjector's BatchNorm1d layouts)."""

    shape: tuple[int, int]

    @nn.compact
    def __call__(self, tokens, *, train: bool):
        length, dim = self.shape
        x = batch_norm(train, axis=1, name="bn_tokens")(tokens)
        x = _dense(dim, "proj_channels")(x)
        x = batch_norm(train, name="bn_channels")(x)
        x = _dense(length, "proj_tokens")(jnp.swapaxes(x, 1, 2))
        return jnp.swapaxes(x, 1, 2)


class SqueezeExcite(nn.Module):
    """x * sigmoid(conv(relu(conv(mean_hw x)))): the gate applied, unlike the official code;
    `gate_only` returns the gate alone, broadcast over space, as the official code does."""

    gate_only: bool = False

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        gate = jnp.mean(x, axis=(1, 2), keepdims=True)
        gate = nn.relu(_conv(max(channels // SE_RATIO, 1), 1, "compress")(gate))
        gate = jax.nn.sigmoid(_conv(channels, 1, "excitation")(gate))
        return jnp.broadcast_to(gate, x.shape) if self.gate_only else x * gate


class PromptBlock(nn.Module):
    """AFP before one teacher stage: `x + beta * prompt(fuse(x, feedback))` on the grid."""

    se_gate_only: bool = False

    @nn.compact
    def __call__(self, grid, feedback, has_feedback, *, train: bool):
        channels = grid.shape[-1]
        # As the official projector: BN + 1 x 1 conv whenever the feedback's shape differs.
        align = feedback.shape[1:] != grid.shape[1:]
        feedback = nearest_resize(feedback, grid.shape[1], grid.shape[2])
        if align:
            feedback = batch_norm(train, name="feedback_bn")(feedback)
            feedback = _conv(channels, 1, "feedback_align", use_bias=False)(feedback)
        fused = jnp.concatenate([grid, feedback.astype(grid.dtype)], axis=-1)
        for i, kernel in enumerate((1, 5, 1)):
            fused = _conv(channels, kernel, f"fusion_{i}")(fused)
        fused = _conv(channels, 1, "fusion_3")(SqueezeExcite(self.se_gate_only, name="fusion_se")(fused))
        mask = has_feedback.reshape(-1, 1, 1, 1).astype(grid.dtype)
        x = mask * fused + (1 - mask) * grid  # no feedback before the first step
        x = _conv(channels, 1, "prompt_0", groups=PROMPT_GROUPS)(x)
        x = _conv(channels, 5, "prompt_1", groups=channels)(x)
        x = _conv(channels, 1, "prompt_2")(x)
        x = _conv(channels, 1, "prompt_3", groups=PROMPT_GROUPS)(SqueezeExcite(self.se_gate_only, name="prompt_se")(x))
        beta = self.param("beta", nn.initializers.zeros, (), jnp.float32)
        return (grid + beta * x).astype(grid.dtype)


@register_method("pat", teacher="rerun", per_example=True)
class PAT(Method):
    temperature: float = 1.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    hcl_weight: float = 1.0
    prompt_reg_weight: float = 1.0
    # True: the prompt blocks' squeeze-and-excitation returns its gate alone (the official
    # code's behaviour, which produced the published numbers); False: x * gate.
    se_gate_only: bool = False
    teacher_stage_shapes: tuple[tuple[int, ...], ...] = derived()
    teacher_token_stages: bool = derived()

    @classmethod
    def derive(cls, config, student, teacher, ctx):
        if len(student.stage_shapes) != len(teacher.stage_shapes):
            raise ConfigError(f"PAT aligns student stage k with teacher stage k: student "
                              f"{student.name!r} has {len(student.stage_shapes)} stages, "
                              f"teacher {teacher.name!r} {len(teacher.stage_shapes)}")
        return {**super().derive(config, student, teacher, ctx),
                "teacher_stage_shapes": teacher.stage_shapes,
                "teacher_token_stages": teacher.token_stages}

    @nn.compact
    def __call__(self, student, teacher, batch, *, train: bool):
        num_stages = len(self.teacher_stage_shapes)
        blended = RegionAwareAttention(num_stages, name="raa")(
            [split_grid(f)[1] for f in student.features["stages"]])

        batch_size = student.logits.shape[0]
        feedback = [self.variable(PER_EXAMPLE_COLLECTION, f"feedback_{i}", jnp.zeros,
                                  (batch_size, *_grid_shape(shape)), jnp.float32)
                    for i, shape in enumerate(self.teacher_stage_shapes)]
        has_feedback = self.variable(PER_EXAMPLE_COLLECTION, "has_feedback", jnp.zeros,
                                     (batch_size,), jnp.float32)
        prompts = [PromptBlock(self.se_gate_only, name=f"prompt_{i}") for i in range(num_stages)]

        def pre_stage(i, x):
            prefix, grid = split_grid(x)
            prompted = prompts[i](grid, feedback[i].value, has_feedback.value, train=train)
            return join_grid(prefix, prompted, x)

        p_logits, p_features = teacher.rerun(pre_stage)
        hcl_terms, differences = [], []
        for i, shape in enumerate(self.teacher_stage_shapes):
            height, width, channels = _grid_shape(shape)
            aligner = (TokenAligner((height * width, channels), name=f"align_{i}")
                       if self.teacher_token_stages else MapAligner(shape, name=f"align_{i}"))
            aligned = split_grid(aligner(blended[i], train=train))[1]
            target = split_grid(p_features["stages"][i])[1]
            hcl_terms.append(losses.hcl_loss(aligned, target))
            differences.append(jax.lax.stop_gradient(aligned - target).astype(jnp.float32))
        if train:
            for variable, difference in zip(feedback, differences):
                variable.value = difference
            has_feedback.value = jnp.ones_like(has_feedback.value)

        return {
            "ce": Term(self.ce_weight, self.supervised_loss(student.logits, batch["label"])),
            "kd": Term(self.kd_weight, losses.kd_loss(student.logits, teacher.logits,
                                                      temperature=self.temperature)),
            "hcl": Term(self.hcl_weight, sum(hcl_terms)),
            "prompt_reg": Term(self.prompt_reg_weight, losses.kd_loss(p_logits, teacher.logits)),
            **{f"hcl_stage{i + 1}": Term(None, h) for i, h in enumerate(hcl_terms)},
        }


def _grid_shape(stage_shape) -> tuple[int, int, int]:
    """The (h, w, C) grid of a stage shape: a map as it is, tokens without their prefix."""
    if len(stage_shape) == 3:
        return tuple(stage_shape)
    _, side = token_layout(stage_shape)
    return side, side, stage_shape[-1]
