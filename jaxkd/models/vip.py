"""Vision Permutator (ViP) as OFA-KD's code defines it (custom_model/vip.py of Hao840/OFAKD).

A patch-embedding conv, then four stages of Permutator blocks on an NHWC token grid. Each block
mixes its (LayerNorm-ed) input along height, width and channels with three Linear layers and
sums the three with per-channel softmax weights (WeightedPermuteMLP), then applies a channel
MLP. Between stages a Downsample conv (kernel = stride = 2 where the stage is a transition, 1
where only the width changes) is its own entry of the original's `network` list, so module names
here are `network_{entry}_{block}` for blocks and `network_{entry}` for Downsamples, the
original's `network.<entry>.<block>` state-dict keys. The stage features are the outputs of the
four block stacks as [B, L, C] token sequences (custom_forward/vip.py's stage_info); the
embedding is the token mean after the final LayerNorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models.layers import (TORCH_LN_EPS, TRUNC_NORMAL_02, classifier, conv2d, drop_path,
                                 drop_path_rates, layer_norm, torch_linear_init)
from jaxkd.models.registry import IMAGENET_MEAN, IMAGENET_STD, register_model
from jaxkd.models.vit import Mlp, PreStage, check_image, to_2tuple

NUM_STAGES = 4


class PatchConv(nn.Module):
    """The original's PatchEmbed and Downsample: one `proj` conv, kernel = stride =
    `patch_size`, no padding, with PyTorch's default conv init (ViP re-initialises only
    Linear and LayerNorm)."""

    features: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel_init, bias_init = torch_linear_init(x.shape[-1] * self.patch_size ** 2)
        return conv2d(self.features, self.patch_size, self.patch_size, padding=0, use_bias=True,
                      kernel_init=kernel_init, bias_init=bias_init, dtype=self.dtype,
                      name="proj")(x)


class WeightedPermuteMLP(nn.Module):
    """Height, width and channel mixing of a [B, H, W, C] grid, summed with weights from a
    softmax over the three branches, per channel.

    Height mixing splits the channels into `segment_dim` segments of S = C / segment_dim and
    mixes, for each segment and column, the H * S values of that column with one C x C
    Linear: it needs H == segment_dim (width mixing likewise W == segment_dim).
    """

    segment_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        seg, s = self.segment_dim, c // self.segment_dim
        dense = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=TRUNC_NORMAL_02)
        # [B, H, W, seg, S] -> [B, seg, W, H * S]: a column's values of one segment, mixed.
        mixed_h = x.reshape(b, h, w, seg, s).transpose(0, 3, 2, 1, 4).reshape(b, seg, w, h * s)
        mixed_h = nn.Dense(c, use_bias=False, name="mlp_h", **dense)(mixed_h)
        mixed_h = mixed_h.reshape(b, seg, w, h, s).transpose(0, 3, 2, 1, 4).reshape(b, h, w, c)
        # [B, H, W, seg, S] -> [B, H, seg, W * S]: a row's values of one segment, mixed.
        mixed_w = x.reshape(b, h, w, seg, s).transpose(0, 1, 3, 2, 4).reshape(b, h, seg, w * s)
        mixed_w = nn.Dense(c, use_bias=False, name="mlp_w", **dense)(mixed_w)
        mixed_w = mixed_w.reshape(b, h, seg, w, s).transpose(0, 1, 3, 2, 4).reshape(b, h, w, c)
        mixed_c = nn.Dense(c, use_bias=False, name="mlp_c", **dense)(x)

        pooled = (mixed_h + mixed_w + mixed_c).mean(axis=(1, 2))
        weights = Mlp(c // 4, 3 * c, dtype=self.dtype, name="reweight")(pooled)
        weights = jax.nn.softmax(weights.reshape(b, c, 3).astype(jnp.float32), axis=-1)
        weights = weights.astype(x.dtype)[:, None, None]  # [B, 1, 1, C, 3]
        x = (mixed_h * weights[..., 0] + mixed_w * weights[..., 1]
             + mixed_c * weights[..., 2])
        return nn.Dense(c, name="proj", **dense)(x)


class PermutatorBlock(nn.Module):
    """x + permute_mlp(norm1(x)) / skip_lam, then x + mlp(norm2(x)) / skip_lam."""

    segment_dim: int
    mlp_ratio: float
    skip_lam: float = 1.0
    drop_path_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        dim = x.shape[-1]
        y = layer_norm(TORCH_LN_EPS, self.dtype, "norm1")(x)
        y = WeightedPermuteMLP(self.segment_dim, self.dtype, name="attn")(y)
        x = x + drop_path(self, y, self.drop_path_rate, train) / self.skip_lam
        y = layer_norm(TORCH_LN_EPS, self.dtype, "norm2")(x)
        y = Mlp(int(dim * self.mlp_ratio), dim, dtype=self.dtype, name="mlp")(y)
        return x + drop_path(self, y, self.drop_path_rate, train) / self.skip_lam


class VisionPermutator(nn.Module):
    """The original's VisionPermutator with four stages; per-stage sequences have 4 entries
    (`transitions[3]` is unused, as in the original)."""

    layers: Sequence[int]
    patch_size: int
    embed_dims: Sequence[int]
    transitions: Sequence[bool]
    segment_dim: Sequence[int]
    mlp_ratios: Sequence[float]
    num_classes: int = 1000
    img_size: int | Sequence[int] = 224
    in_chans: int = 3
    skip_lam: float = 1.0
    drop_path_rate: float = 0.0  # the original's default
    dtype: jnp.dtype = jnp.float32

    def network_entries(self) -> list[tuple[int, int | None]]:
        """Each stage's index in the original's `network` list, and that of the Downsample
        after it (None where there is none)."""
        entries, index = [], 0
        for i in range(NUM_STAGES):
            downsample = None
            if i < NUM_STAGES - 1 and (self.transitions[i]
                                       or self.embed_dims[i] != self.embed_dims[i + 1]):
                downsample = index + 1
            entries.append((index, downsample))
            index += 1 if downsample is None else 2
        return entries

    def stage_grids(self) -> list[tuple[int, int]]:
        """Each stage's (H, W): the patch conv and the 2x2 Downsamples floor, as PyTorch's."""
        img_size = to_2tuple(self.img_size)
        grid = (img_size[0] // self.patch_size, img_size[1] // self.patch_size)
        grids = [grid]
        for i in range(NUM_STAGES - 1):
            if self.transitions[i]:
                grid = (grid[0] // 2, grid[1] // 2)
            grids.append(grid)
        return grids

    def _check_config(self):
        per_stage = dict(layers=self.layers, embed_dims=self.embed_dims,
                         transitions=self.transitions, segment_dim=self.segment_dim,
                         mlp_ratios=self.mlp_ratios)
        for key, value in per_stage.items():
            if len(value) != NUM_STAGES:
                raise ValueError(f"ViP here has {NUM_STAGES} stages: {key} needs "
                                 f"{NUM_STAGES} entries, got {tuple(value)}")
        if min(self.layers) < 1:
            raise ValueError(f"every stage needs at least one block, got layers={self.layers}")
        for i, ((h, w), dim, seg) in enumerate(zip(self.stage_grids(), self.embed_dims,
                                                   self.segment_dim)):
            if seg < 1 or h != seg or w != seg or dim % seg:
                raise ValueError(
                    f"stage {i + 1} of {NUM_STAGES}: its {h}x{w} token grid and width {dim} do "
                    f"not fit segment_dim={seg}; height/width mixing needs a segment_dim x "
                    f"segment_dim grid and a width divisible by segment_dim (set segment_dim "
                    f"per stage to the grid img_size={self.img_size} gives)")

    @nn.compact
    def __call__(self, images, train: bool = False, pre_stage: PreStage = None):
        self._check_config()
        check_image(images, to_2tuple(self.img_size), self.in_chans, type(self).__name__)
        x = PatchConv(self.embed_dims[0], self.patch_size, self.dtype,
                      name="patch_embed")(images)
        rates = drop_path_rates(self.drop_path_rate, sum(self.layers))
        stages = []
        for i, (entry, downsample) in enumerate(self.network_entries()):
            b, h, w, c = x.shape
            if pre_stage is not None:
                x = pre_stage(i, x.reshape(b, h * w, c)).reshape(b, h, w, c)
            first = sum(self.layers[:i])
            for j in range(self.layers[i]):
                x = PermutatorBlock(self.segment_dim[i], self.mlp_ratios[i], self.skip_lam,
                                    rates[first + j], self.dtype,
                                    name=f"network_{entry}_{j}")(x, train)
            stages.append(x.reshape(b, h * w, c))
            if downsample is not None:
                x = PatchConv(self.embed_dims[i + 1], 2 if self.transitions[i] else 1,
                              self.dtype, name=f"network_{downsample}")(x)
        x = layer_norm(TORCH_LN_EPS, self.dtype, "norm")(stages[-1])
        embedding = x.mean(axis=1)
        logits = classifier(self.num_classes, embedding, dtype=self.dtype,
                            kernel_init=TRUNC_NORMAL_02)
        return logits, {"embedding": embedding, "stages": stages}


def _vip(num_classes: int, defaults: dict, overrides: dict) -> VisionPermutator:
    kwargs = {**defaults, **overrides}
    for key in ("layers", "img_size", "embed_dims", "transitions", "segment_dim", "mlp_ratios"):
        if isinstance(kwargs.get(key), list):  # module fields must be hashable
            kwargs[key] = tuple(kwargs[key])
    return VisionPermutator(num_classes=num_classes, **kwargs)


@register_model("vip_s7", family="mlp", mean=IMAGENET_MEAN, std=IMAGENET_STD, eval_crop_pct=0.9,
                token_stages=True)
def vip_s7(num_classes: int = 1000, **overrides) -> VisionPermutator:
    """ViP-S/7, OFA-KD's ImageNet MLP student (25M parameters)."""
    return _vip(num_classes, dict(layers=(4, 3, 8, 3), patch_size=7,
                                  embed_dims=(192, 384, 384, 384),
                                  transitions=(True, False, False, False),
                                  segment_dim=(32, 16, 16, 16), mlp_ratios=(3, 3, 3, 3)),
                overrides)
