"""ViT / DeiT as timm 1.0 builds them (pre-norm blocks, class token, learned position embedding).

Submodule names mirror timm's module tree (`patch_embed/proj`, `blocks_3/attn/qkv`, ...) so that
`jaxkd.convert.vit` maps every variable to its state-dict key by renaming alone. The token-model
building blocks here (PatchEmbed, Mlp, attention, the stage rule) are shared with swin.py/mlp.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models.layers import (TIMM_LN_EPS, TRUNC_NORMAL_02, classifier, conv2d, drop_path,
                                 drop_path_rates, layer_norm)
from jaxkd.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    register_model,
)

PreStage = Callable[[int, jax.Array], jax.Array] | None

# 1-based block numbers ending the four stages of a 12-block model (REFERENCE.md section 2).
_STAGE_ENDS_OF_12 = (2, 4, 10, 12)


def stage_end_blocks(depth: int) -> tuple[int, int, int, int]:
    """0-based indices of the blocks whose outputs are the four stages of a `depth`-block model.

    Rule: block numbers 2, 4, 10, 12 of 12 are scaled to `depth` (round half up), then each is
    pushed past its predecessor so the four are distinct; the last is always the final block.
    depth 12 -> (1, 3, 9, 11), depth 4 -> (0, 1, 2, 3), depth 8 -> (0, 2, 6, 7).
    """
    if depth < 4:
        raise ValueError(f"a token model needs at least 4 blocks for 4 stages, got depth={depth}")
    ends = []
    for end in _STAGE_ENDS_OF_12:
        number = math.floor(end * depth / 12 + 0.5)
        if ends:
            number = max(number, ends[-1] + 1)
        ends.append(number)
    return tuple(n - 1 for n in ends)


def stage_start_blocks(depth: int) -> tuple[int, int, int, int]:
    """0-based index of the first block of each stage: where `pre_stage` hooks in."""
    ends = stage_end_blocks(depth)
    return (0,) + tuple(e + 1 for e in ends[:-1])


def to_2tuple(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def check_image(images: jax.Array, img_size: tuple[int, int], in_chans: int, model: str):
    """timm builds these models for one input size; say so instead of failing in a reshape."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (*img_size, in_chans):
        raise ValueError(f"{model} was built for NHWC images of shape [B, {img_size[0]}, "
                         f"{img_size[1]}, {in_chans}], got {tuple(images.shape)}; build it "
                         f"with img_size=... to change the input size")


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: a patch-size-strided conv (`proj`), optional LayerNorm (`norm`).

    Returns the NHWC token grid; the conv floors a size the patch does not divide, as timm's.
    """

    embed_dim: int
    patch_size: int | Sequence[int]
    norm_eps: float | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        patch = to_2tuple(self.patch_size)
        x = conv2d(self.embed_dim, patch, patch, padding=0, use_bias=True, dtype=self.dtype,
                   name="proj")(images.astype(self.dtype))
        if self.norm_eps is not None:
            x = layer_norm(self.norm_eps, self.dtype, "norm")(x)
        return x


class Mlp(nn.Module):
    """timm's Mlp: fc1 -> exact GELU -> fc2."""

    hidden_features: int
    out_features: int
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = TRUNC_NORMAL_02
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        dense = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=self.kernel_init,
                     bias_init=self.bias_init)
        x = nn.Dense(self.hidden_features, name="fc1", **dense)(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(self.out_features, name="fc2", **dense)(x)


def attention_weights(q: jax.Array, k: jax.Array, scale: float,
                      bias: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T * scale + bias) over the last axis, in float32; [..., heads, N, N]."""
    logits = jnp.einsum("...hqd,...hkd->...hqk", q * scale, k).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    return jax.nn.softmax(logits, axis=-1)


class Attention(nn.Module):
    """Multi-head self attention with one fused qkv projection, as timm's Attention."""

    dim: int
    num_heads: int
    qkv_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, tokens, _ = x.shape
        head_dim = self.dim // self.num_heads
        dense = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=TRUNC_NORMAL_02)
        qkv = nn.Dense(3 * self.dim, use_bias=self.qkv_bias, name="qkv", **dense)(x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = attention_weights(q, k, head_dim ** -0.5).astype(v.dtype)
        x = jnp.einsum("bhqk,bhkd->bqhd", weights, v).reshape(batch, tokens, self.dim)
        return nn.Dense(self.dim, name="proj", **dense)(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        y = layer_norm(TIMM_LN_EPS, self.dtype, "norm1")(x)
        y = Attention(self.dim, self.num_heads, dtype=self.dtype, name="attn")(y)
        x = x + drop_path(self, y, self.drop_path_rate, train)
        y = layer_norm(TIMM_LN_EPS, self.dtype, "norm2")(x)
        y = Mlp(int(self.dim * self.mlp_ratio), self.dim, dtype=self.dtype, name="mlp")(y)
        return x + drop_path(self, y, self.drop_path_rate, train)


class VisionTransformer(nn.Module):
    """timm's VisionTransformer with its defaults: class-token pooling, final norm, no fc_norm."""

    num_classes: int = 1000
    img_size: int | Sequence[int] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False, pre_stage: PreStage = None):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by "
                             f"num_heads={self.num_heads}")
        stage_starts, stage_ends = stage_start_blocks(self.depth), stage_end_blocks(self.depth)
        check_image(images, to_2tuple(self.img_size), self.in_chans, type(self).__name__)
        x = PatchEmbed(self.embed_dim, self.patch_size, dtype=self.dtype, name="patch_embed")(
            images)
        grid = x.shape[1:3]
        x = x.reshape(x.shape[0], grid[0] * grid[1], self.embed_dim)
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6),
                               (1, 1, self.embed_dim), jnp.float32)
        pos_embed = self.param("pos_embed", TRUNC_NORMAL_02,
                               (1, grid[0] * grid[1] + 1, self.embed_dim), jnp.float32)
        cls_tokens = jnp.broadcast_to(cls_token.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
        x = jnp.concatenate([cls_tokens, x], axis=1) + pos_embed.astype(x.dtype)

        rates = drop_path_rates(self.drop_path_rate, self.depth)
        stages = []
        for i in range(self.depth):
            if pre_stage is not None and i in stage_starts:
                x = pre_stage(stage_starts.index(i), x)
            x = Block(self.embed_dim, self.num_heads, self.mlp_ratio, rates[i], self.dtype,
                      name=f"blocks_{i}")(x, train)
            if i in stage_ends:
                stages.append(x)
        x = layer_norm(TIMM_LN_EPS, self.dtype, "norm")(x)
        embedding = x[:, 0]
        logits = classifier(self.num_classes, embedding, dtype=self.dtype,
                            kernel_init=TRUNC_NORMAL_02)
        return logits, {"embedding": embedding, "stages": stages}


def _vit(num_classes: int, defaults: dict, overrides: dict) -> VisionTransformer:
    kwargs = {**defaults, **overrides}
    for key in ("img_size", "patch_size"):
        if isinstance(kwargs.get(key), list):  # module fields must be hashable
            kwargs[key] = tuple(kwargs[key])
    return VisionTransformer(num_classes=num_classes, **kwargs)


@register_model("deit_tiny_patch16_224", family="vit", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                eval_crop_pct=0.9)
def deit_tiny_patch16_224(num_classes: int = 1000, **overrides) -> VisionTransformer:
    return _vit(num_classes, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), overrides)


@register_model("vit_small_patch16_224", family="vit", mean=INCEPTION_MEAN, std=INCEPTION_STD,
                eval_crop_pct=0.9)
def vit_small_patch16_224(num_classes: int = 1000, **overrides) -> VisionTransformer:
    return _vit(num_classes, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), overrides)


@register_model("vit_base_patch16_224", family="vit", mean=INCEPTION_MEAN, std=INCEPTION_STD,
                eval_crop_pct=0.9)
def vit_base_patch16_224(num_classes: int = 1000, **overrides) -> VisionTransformer:
    return _vit(num_classes, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
                overrides)
