"""HireMLP (Guo et al., CVPR 2022) as the official OFA-KD code defines it
(custom_model/hire_mlp.py), in NHWC.

A conv stem (7x7/4 + BN + ReLU), four stages of HireBlocks with a 3x3/2 conv + BN + ReLU
between them, a final BatchNorm and the spatial mean. Every block mixes tokens with HireMLP:
inner-region rearrangement (each run of `pixel` rows, or columns, is stacked on the channels
and mixed by a 1x1-conv MLP) after a cross-region shift by `step`, plus a channel branch, the
three reweighted per channel by a softmax. All of the original's 1x1 convs stay 1x1 convs, so
the variables have its checkpoint layout.

Module names mirror the original's keys with '_' for '.' at the top level: `network_{2i}_{j}`
is block j of stage i (`network.{2i}.{j}`), `network_{2i+1}` the downsampling after stage i.
Stage features are the outputs of network entries 0, 2, 4, 6 (OFA-KD's `stage_info`), maps
before the downsampling that follows them; the embedding is the spatial mean after `norm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxkd.errors import ConfigError
from jaxkd.models.layers import (TRUNC_NORMAL_02, batch_norm, classifier, conv2d, drop_path,
                                 drop_path_rates)
from jaxkd.models.registry import IMAGENET_MEAN, IMAGENET_STD, register_model
from jaxkd.models.vit import PreStage

STEP_PAD_MODES = ("c", "0")  # circular roll, or a shift that fills with zeros
# The original's pixel pad modes -> jnp.pad's ('c' is F.pad's 'circular').
_PIXEL_PAD = {"c": "wrap", "0": "constant", "replicate": "edge"}


def check_pad_modes(step_pad_mode: str, pixel_pad_mode: str) -> None:
    if step_pad_mode not in STEP_PAD_MODES:
        raise ConfigError(f"HireMLP step_pad_mode must be one of {STEP_PAD_MODES}, got "
                          f"{step_pad_mode!r}")
    if pixel_pad_mode not in _PIXEL_PAD:
        raise ConfigError(f"HireMLP pixel_pad_mode must be one of {tuple(_PIXEL_PAD)}, got "
                          f"{pixel_pad_mode!r}")


def _conv1x1(features: int, use_bias: bool, dtype: Any, name: str):
    return conv2d(features, 1, use_bias=use_bias, kernel_init=TRUNC_NORMAL_02, dtype=dtype,
                  name=name)


def _pad_widths(ndim: int, axis: int, before: int, after: int) -> list[tuple[int, int]]:
    widths = [(0, 0)] * ndim
    widths[axis] = (before, after)
    return widths


def cross_region_shift(x: jax.Array, step: int, axis: int, mode: str) -> jax.Array:
    """Moves the map `step` rows down (axis 1) or columns right (axis 2): a circular roll
    ('c'), or zeros coming in at the top/left and the end falling off ('0')."""
    if mode == "c":
        return jnp.roll(x, step, axis)
    padded = jnp.pad(x, _pad_widths(x.ndim, axis, step, 0))
    return lax.slice_in_dim(padded, 0, x.shape[axis], axis=axis)


def pad_to_multiple(x: jax.Array, pixel: int, axis: int, mode: str) -> jax.Array:
    """Pads the bottom (axis 1) or right (axis 2) up to a multiple of `pixel`: by wrapping
    around ('c'), with zeros ('0') or by repeating the last row/column ('replicate')."""
    return jnp.pad(x, _pad_widths(x.ndim, axis, 0, -x.shape[axis] % pixel),
                   mode=_PIXEL_PAD[mode])


def fold_regions(x: jax.Array, pixel: int, axis: int) -> jax.Array:
    """[B, H, W, C] -> [B, H / p, W, C * p] (axis 1; axis 2 folds W): channel c * p + i of
    region r holds channel c of row (column) r * p + i, the original's NCHW channel order."""
    shape = x.shape
    x = x.reshape(shape[:axis] + (shape[axis] // pixel, pixel) + shape[axis + 1:])
    x = jnp.moveaxis(x, axis + 1, -1)
    return x.reshape(x.shape[:-2] + (-1,))


def unfold_regions(x: jax.Array, pixel: int, axis: int) -> jax.Array:
    """Inverse of `fold_regions`."""
    x = x.reshape(x.shape[:-1] + (x.shape[-1] // pixel, pixel))
    x = jnp.moveaxis(x, -1, axis + 1)
    shape = x.shape
    return x.reshape(shape[:axis] + (shape[axis] * pixel,) + shape[axis + 2:])


class ConvMlp(nn.Module):
    """The original's Mlp: 1x1 conv `fc1` -> exact GELU -> 1x1 conv `fc2`, both with bias."""

    hidden_features: int
    out_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _conv1x1(self.hidden_features, True, self.dtype, "fc1")(x)
        x = nn.gelu(x, approximate=False)
        return _conv1x1(self.out_features, True, self.dtype, "fc2")(x)


class HireMLP(nn.Module):
    """Token mixing of one block: height and width branches over regions of `pixel` rows and
    columns (after a cross-region shift by `step`), a channel branch `mlp_c`, mixed per
    channel with softmax weights from `reweight` on their spatial mean, then `proj`."""

    pixel: int
    step: int
    step_pad_mode: str = "c"
    pixel_pad_mode: str = "c"
    dtype: Any = jnp.float32

    def _region_branch(self, x, axis: int, branch: str, train: bool):
        """Shift, pad, fold, 1x1 MLP with a BN bottleneck of C/2, unfold, crop, unshift."""
        size, dim = x.shape[axis], x.shape[-1]
        if self.step:
            x = cross_region_shift(x, self.step, axis, self.step_pad_mode)
        x = fold_regions(pad_to_multiple(x, self.pixel, axis, self.pixel_pad_mode), self.pixel,
                         axis)
        x = _conv1x1(dim // 2, False, self.dtype, f"mlp_{branch}1")(x)
        x = batch_norm(train, dtype=self.dtype, name=f"mlp_{branch}1_norm")(x)
        x = _conv1x1(dim * self.pixel, True, self.dtype, f"mlp_{branch}2")(nn.relu(x))
        x = lax.slice_in_dim(unfold_regions(x, self.pixel, axis), 0, size, axis=axis)
        if self.step and self.step_pad_mode == "c":  # the original undoes only the roll
            x = jnp.roll(x, -self.step, axis)
        return x

    @nn.compact
    def __call__(self, x, train: bool):
        check_pad_modes(self.step_pad_mode, self.pixel_pad_mode)
        dim = x.shape[-1]
        h = self._region_branch(x, 1, "h", train)
        w = self._region_branch(x, 2, "w", train)
        c = _conv1x1(dim, True, self.dtype, "mlp_c")(x)
        weights = ConvMlp(dim // 4, dim * 3, self.dtype, name="reweight")(
            jnp.mean(h + w + c, axis=(1, 2), keepdims=True))
        weights = weights.reshape(weights.shape[:-1] + (dim, 3))  # channel d * 3 + branch
        weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1).astype(h.dtype)
        x = h * weights[..., 0] + w * weights[..., 1] + c * weights[..., 2]
        return _conv1x1(dim, True, self.dtype, "proj")(x)


class HireBlock(nn.Module):
    """x + HireMLP(BN(x)), then x + ConvMlp(BN(x)); stochastic depth on both branches."""

    pixel: int
    step: int
    mlp_ratio: float = 4.0
    step_pad_mode: str = "c"
    pixel_pad_mode: str = "c"
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        dim = x.shape[-1]
        y = batch_norm(train, dtype=self.dtype, name="norm1")(x)
        y = HireMLP(self.pixel, self.step, self.step_pad_mode, self.pixel_pad_mode, self.dtype,
                    name="attn")(y, train)
        x = x + drop_path(self, y, self.drop_path_rate, train)
        y = batch_norm(train, dtype=self.dtype, name="norm2")(x)
        y = ConvMlp(int(dim * self.mlp_ratio), dim, self.dtype, name="mlp")(y)
        return x + drop_path(self, y, self.drop_path_rate, train)


class ConvBnRelu(nn.Module):
    """conv (`proj`, with bias) -> BN (`norm`) -> ReLU: the stem and each downsampling."""

    features: int
    kernel: int
    stride: int
    padding: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = conv2d(self.features, self.kernel, self.stride, padding=self.padding, use_bias=True,
                   kernel_init=TRUNC_NORMAL_02, dtype=self.dtype, name="proj")(x)
        return nn.relu(batch_norm(train, dtype=self.dtype, name="norm")(x))


class HireMLPNet(nn.Module):
    """The original's HireMLPNet; block j of stage i shifts by (j % step_stride[i]) *
    step_dilation[i], and stochastic depth grows linearly over all blocks from 0."""

    layers: Sequence[int] = (3, 4, 10, 3)
    embed_dims: Sequence[int] = (64, 128, 320, 512)
    mlp_ratios: Sequence[float] = (4, 4, 4, 4)
    pixel: Sequence[int] = (4, 3, 3, 2)
    step_stride: Sequence[int] = (2, 2, 3, 2)
    step_dilation: Sequence[int] = (2, 2, 1, 1)
    step_pad_mode: str = "c"
    pixel_pad_mode: str = "c"
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False, pre_stage: PreStage = None):
        x = ConvBnRelu(self.embed_dims[0], 7, 4, 2, self.dtype, name="patch_embed")(
            images, train)
        rates = drop_path_rates(self.drop_path_rate, sum(self.layers))
        stages = []
        for stage, depth in enumerate(self.layers):
            if stage > 0:
                x = ConvBnRelu(self.embed_dims[stage], 3, 2, 1, self.dtype,
                               name=f"network_{2 * stage - 1}")(x, train)
            if pre_stage is not None:
                x = pre_stage(stage, x)
            for j in range(depth):
                x = HireBlock(
                    pixel=self.pixel[stage],
                    step=(j % self.step_stride[stage]) * self.step_dilation[stage],
                    mlp_ratio=self.mlp_ratios[stage], step_pad_mode=self.step_pad_mode,
                    pixel_pad_mode=self.pixel_pad_mode,
                    drop_path_rate=rates[sum(self.layers[:stage]) + j], dtype=self.dtype,
                    name=f"network_{2 * stage}_{j}")(x, train)
            stages.append(x)
        x = batch_norm(train, dtype=self.dtype, name="norm")(x)
        embedding = jnp.mean(x, axis=(1, 2))
        logits = classifier(self.num_classes, embedding, kernel_init=TRUNC_NORMAL_02,
                            dtype=self.dtype)
        return logits, {"embedding": embedding, "stages": stages}


_PER_STAGE = ("layers", "embed_dims", "mlp_ratios", "pixel", "step_stride", "step_dilation")


@register_model("hire_mlp_small", family="mlp", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                eval_crop_pct=0.9, token_stages=False)
def hire_mlp_small(num_classes: int = 1000, **overrides) -> HireMLPNet:
    """HireMLP-S; overrides take the original's keyword names (layers, embed_dims, pixel, ...)."""
    kwargs = {key: tuple(value) if key in _PER_STAGE else value
              for key, value in overrides.items()}
    model = HireMLPNet(num_classes=num_classes, **kwargs)
    lengths = {key: len(getattr(model, key)) for key in _PER_STAGE}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"HireMLP's per-stage settings must all have one entry per stage, got "
                          f"lengths {lengths}")
    check_pad_modes(model.step_pad_mode, model.pixel_pad_mode)
    return model
