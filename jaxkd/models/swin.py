"""Swin Transformer as timm 1.0 builds it (patch merging at the start of stages 2-4).

Everything that depends only on the build-time resolution (each block's window and shift, the
relative-position index, the shifted-window mask) is computed here in numpy, exactly as timm
recomputes its non-persistent buffers, so checkpoints carry only learned tensors. Like timm 1.0,
a feature map the window does not tile is zero-padded at the bottom/right before windowing (and
an odd one before patch merging), and a stage no larger than the window uses one window of its
whole size without a shift.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxkd.models.layers import (TORCH_LN_EPS, TRUNC_NORMAL_02, classifier, drop_path,
                                 drop_path_rates, layer_norm)
from jaxkd.models.registry import IMAGENET_MEAN, IMAGENET_STD, register_model
from jaxkd.models.vit import Mlp, PatchEmbed, PreStage, attention_weights, check_image, to_2tuple


def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """[Wh*Ww, Wh*Ww] rows of the bias table for each (query, key) pair, as timm's."""
    coords = np.stack(np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing="ij"))
    coords = coords.reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    relative[:, :, 0] += window[0] - 1
    relative[:, :, 1] += window[1] - 1
    relative[:, :, 0] *= 2 * window[1] - 1
    return relative.sum(-1)


def window_partition(x, window: tuple[int, int]):
    """[B, H, W, C] -> [B * num_windows, Wh * Ww, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window[0], window[0], w // window[1], window[1], c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def window_reverse(windows, window: tuple[int, int], height: int, width: int):
    """Inverse of `window_partition` for a [height, width] map."""
    c = windows.shape[-1]
    x = windows.reshape(-1, height // window[0], width // window[1], window[0], window[1], c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def shifted_window_mask(resolution: tuple[int, int], window: tuple[int, int],
                        shift: tuple[int, int]) -> np.ndarray:
    """[num_windows, N, N] additive mask (0 / -100) keeping attention inside shifted regions.

    timm labels the regions on the map padded up to a multiple of the window.
    """
    height = math.ceil(resolution[0] / window[0]) * window[0]
    width = math.ceil(resolution[1] / window[1]) * window[1]
    regions = np.zeros((1, height, width, 1), np.float32)
    label = 0
    for rows in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for cols in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            regions[:, rows, cols, :] = label
            label += 1
    labels = window_partition(regions, window)[..., 0]
    return np.where(labels[:, None, :] - labels[:, :, None] != 0, -100.0, 0.0).astype(np.float32)


def block_window(resolution: tuple[int, int], window: tuple[int, int],
                 shifted: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """timm's per-block window and shift: a map no larger than the window is one window."""
    sizes = tuple(min(r, w) for r, w in zip(resolution, window))
    shifts = tuple(0 if (r <= w or not shifted) else w // 2 for r, w in zip(resolution, sizes))
    return sizes, shifts


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with a learned relative-position bias table."""

    dim: int
    num_heads: int
    window: tuple[int, int]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask: np.ndarray | None):
        windows, tokens, _ = x.shape
        head_dim = self.dim // self.num_heads
        table = self.param("relative_position_bias_table", TRUNC_NORMAL_02,
                           ((2 * self.window[0] - 1) * (2 * self.window[1] - 1), self.num_heads),
                           jnp.float32)
        index = relative_position_index(self.window).reshape(-1)
        bias = table[index].reshape(tokens, tokens, self.num_heads).transpose(2, 0, 1)
        dense = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=TRUNC_NORMAL_02)
        qkv = nn.Dense(3 * self.dim, name="qkv", **dense)(x)
        qkv = qkv.reshape(windows, tokens, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if mask is not None:
            # [B * nW, heads, N, N] logits: the mask repeats over the batch, per window.
            bias = bias[None] + jnp.asarray(mask)[:, None]
            bias = jnp.tile(bias, (windows // mask.shape[0], 1, 1, 1))
        weights = attention_weights(q, k, head_dim ** -0.5, bias).astype(v.dtype)
        x = jnp.einsum("bhqk,bhkd->bqhd", weights, v).reshape(windows, tokens, self.dim)
        return nn.Dense(self.dim, name="proj", **dense)(x)


class SwinBlock(nn.Module):
    """(Shifted-)window attention block on an NHWC map."""

    dim: int
    num_heads: int
    resolution: tuple[int, int]
    window: tuple[int, int]
    shifted: bool
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        _, h, w, c = x.shape
        window, shift = block_window(self.resolution, self.window, self.shifted)
        has_shift = any(shift)
        y = layer_norm(TORCH_LN_EPS, self.dtype, "norm1")(x)
        if has_shift:
            y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
        pad_h, pad_w = (-h) % window[0], (-w) % window[1]
        y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        mask = shifted_window_mask(self.resolution, window, shift) if has_shift else None
        y = WindowAttention(c, self.num_heads, window, self.dtype, name="attn")(
            window_partition(y, window), mask)
        y = window_reverse(y, window, h + pad_h, w + pad_w)[:, :h, :w]
        if has_shift:
            y = jnp.roll(y, shift, axis=(1, 2))
        x = x + drop_path(self, y, self.drop_path_rate, train)
        y = layer_norm(TORCH_LN_EPS, self.dtype, "norm2")(x)
        y = Mlp(int(c * self.mlp_ratio), c, dtype=self.dtype, name="mlp")(y)
        return x + drop_path(self, y, self.drop_path_rate, train)


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (timm's order) -> LayerNorm(4C) -> Linear(4C, 2C, no bias)."""

    out_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        h, w = x.shape[1] // 2, x.shape[2] // 2
        x = x.reshape(b, h, 2, w, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h, w, 4 * c)
        x = layer_norm(TORCH_LN_EPS, self.dtype, "norm")(x)
        return nn.Dense(self.out_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=TRUNC_NORMAL_02, name="reduction")(x)


class SwinStage(nn.Module):
    """Optional patch merging, then `depth` blocks alternating plain and shifted windows."""

    out_dim: int
    depth: int
    num_heads: int
    resolution: tuple[int, int]  # after this stage's patch merging
    window: tuple[int, int]
    downsample: bool
    mlp_ratio: float
    drop_path_rates: tuple[float, ...]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, pre_blocks=None):
        if self.downsample:
            x = PatchMerging(self.out_dim, self.dtype, name="downsample")(x)
        if pre_blocks is not None:
            x = pre_blocks(x)
        for i in range(self.depth):
            x = SwinBlock(self.out_dim, self.num_heads, self.resolution, self.window,
                          shifted=i % 2 == 1, mlp_ratio=self.mlp_ratio,
                          drop_path_rate=self.drop_path_rates[i], dtype=self.dtype,
                          name=f"blocks_{i}")(x, train)
        return x


class SwinTransformer(nn.Module):
    """timm's SwinTransformer (4 stages, channels doubling, GAP head)."""

    num_classes: int = 1000
    img_size: int | Sequence[int] = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int | Sequence[int] = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1  # timm's SwinTransformer default (ViT and Mixer: 0)
    dtype: jnp.dtype = jnp.float32

    def _stage_resolutions(self) -> list[tuple[int, int]]:
        """Each stage's map size after its patch merging (which rounds odd sizes up)."""
        img_size, patch = to_2tuple(self.img_size), to_2tuple(self.patch_size)
        grid = (img_size[0] // patch[0], img_size[1] // patch[1])
        if min(grid) < 1:
            raise ValueError(f"img_size={self.img_size} is smaller than "
                             f"patch_size={self.patch_size}")
        resolutions = [grid]
        for _ in range(len(self.depths) - 1):
            resolutions.append(tuple((r + 1) // 2 for r in resolutions[-1]))
        return resolutions

    def _check_config(self):
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(f"Swin here has 4 stages: got depths={self.depths}, "
                             f"num_heads={self.num_heads}")
        if isinstance(self.window_size, (tuple, list)) and len(self.window_size) != 2:
            raise ValueError(f"window_size must be an int or (h, w), got {self.window_size} "
                             f"(per-stage window sizes are not supported)")
        window = to_2tuple(self.window_size)
        if min(window) < 1:
            raise ValueError(f"window_size must be positive, got {self.window_size}")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2 ** i) % heads:
                raise ValueError(f"stage {i} width {self.embed_dim * 2 ** i} is not divisible by "
                                 f"num_heads={heads}")

    @nn.compact
    def __call__(self, images, train: bool = False, pre_stage: PreStage = None):
        self._check_config()
        resolutions = self._stage_resolutions()
        check_image(images, to_2tuple(self.img_size), self.in_chans, type(self).__name__)
        x = PatchEmbed(self.embed_dim, self.patch_size, norm_eps=TORCH_LN_EPS, dtype=self.dtype,
                       name="patch_embed")(images)
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
        stages = []
        for i, depth in enumerate(self.depths):
            first = sum(self.depths[:i])
            # The hook sees the input of the stage's first block, after its patch merging:
            # where the original (and timm 0.6.5) Swin begins a stage, and PAT prompts it.
            hook = None if pre_stage is None else functools.partial(pre_stage, i)
            x = SwinStage(self.embed_dim * 2 ** i, depth, self.num_heads[i], resolutions[i],
                          to_2tuple(self.window_size), downsample=i > 0,
                          mlp_ratio=self.mlp_ratio,
                          drop_path_rates=tuple(rates[first:first + depth]), dtype=self.dtype,
                          name=f"layers_{i}")(x, train, hook)
            stages.append(x)
        x = layer_norm(TORCH_LN_EPS, self.dtype, "norm")(x)
        embedding = x.mean(axis=(1, 2))
        logits = classifier(self.num_classes, embedding, dtype=self.dtype,
                            kernel_init=TRUNC_NORMAL_02)
        return logits, {"embedding": embedding, "stages": stages}


def _swin(num_classes: int, defaults: dict, overrides: dict) -> SwinTransformer:
    kwargs = {**defaults, **overrides}
    for key in ("depths", "num_heads", "img_size", "window_size"):
        if isinstance(kwargs.get(key), list):  # module fields must be hashable
            kwargs[key] = tuple(kwargs[key])
    return SwinTransformer(num_classes=num_classes, **kwargs)


_SWIN_N_P = dict(patch_size=4, window_size=7, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))


@register_model("swin_tiny_patch4_window7_224", family="vit", mean=IMAGENET_MEAN,
                std=IMAGENET_STD, eval_crop_pct=0.9)
def swin_tiny_patch4_window7_224(num_classes: int = 1000, **overrides) -> SwinTransformer:
    return _swin(num_classes, dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2),
                                   num_heads=(3, 6, 12, 24)), overrides)


@register_model("swin_nano_patch4_window7_224", family="vit", mean=IMAGENET_MEAN,
                std=IMAGENET_STD, eval_crop_pct=0.9)
def swin_nano_patch4_window7_224(num_classes: int = 1000, **overrides) -> SwinTransformer:
    """Swin-N of the OFA-KD paper; timm does not register it (build its SwinTransformer)."""
    return _swin(num_classes, dict(_SWIN_N_P, embed_dim=64), overrides)


@register_model("swin_pico_patch4_window7_224", family="vit", mean=IMAGENET_MEAN,
                std=IMAGENET_STD, eval_crop_pct=0.9)
def swin_pico_patch4_window7_224(num_classes: int = 1000, **overrides) -> SwinTransformer:
    """Swin-P of the OFA-KD paper; timm does not register it (build its SwinTransformer)."""
    return _swin(num_classes, dict(_SWIN_N_P, embed_dim=48), overrides)
