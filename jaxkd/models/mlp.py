"""MLP-Mixer and ResMLP as timm 1.0 builds them (timm's mlp_mixer.py, one MlpMixer class).

Both are a patch-embedding stem, `num_blocks` token-mixing + channel-mixing residual blocks,
a final norm and the mean of the tokens. ResMLP swaps LayerNorm for a per-channel Affine, the
token MLP for one Linear, and scales each residual branch by a learned LayerScale. Stages and
`pre_stage` follow the ViT block rule (`jaxkd.models.vit.stage_end_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.layers import TIMM_LN_EPS, classifier, drop_path, layer_norm
from jaxkd.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    register_model,
)
from jaxkd.models.vit import (
    Mlp,
    PatchEmbed,
    PreStage,
    check_image,
    stage_end_blocks,
    stage_start_blocks,
    to_2tuple,
)

# timm's Mixer init (`_init_weights`): xavier-uniform Linear weights with tiny normal biases.
_XAVIER = nn.initializers.xavier_uniform()
_TINY_NORMAL = nn.initializers.normal(1e-6)


class Affine(nn.Module):
    """ResMLP's 'norm': beta + alpha * x per channel (timm keeps both as [1, 1, dim])."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        alpha = self.param("alpha", nn.initializers.ones, (1, 1, dim), jnp.float32)
        beta = self.param("beta", nn.initializers.zeros, (1, 1, dim), jnp.float32)
        return beta.astype(self.dtype) + alpha.astype(self.dtype) * x.astype(self.dtype)


class MixerBlock(nn.Module):
    """x + token_mlp(norm1(x)^T)^T, then x + channel_mlp(norm2(x))."""

    dim: int
    seq_len: int
    mlp_ratio: tuple[float, float]
    drop_path_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        tokens_dim, channels_dim = (int(r * self.dim) for r in self.mlp_ratio)
        mlp = dict(dtype=self.dtype, kernel_init=_XAVIER, bias_init=_TINY_NORMAL)
        y = layer_norm(TIMM_LN_EPS, self.dtype, "norm1")(x).swapaxes(1, 2)
        y = Mlp(tokens_dim, self.seq_len, name="mlp_tokens", **mlp)(y).swapaxes(1, 2)
        x = x + drop_path(self, y, self.drop_path_rate, train)
        y = layer_norm(TIMM_LN_EPS, self.dtype, "norm2")(x)
        y = Mlp(channels_dim, self.dim, name="mlp_channels", **mlp)(y)
        return x + drop_path(self, y, self.drop_path_rate, train)


class ResBlock(nn.Module):
    """x + ls1 * linear_tokens(affine1(x)^T)^T, then x + ls2 * channel_mlp(affine2(x))."""

    dim: int
    seq_len: int
    mlp_ratio: float
    drop_path_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        ls1 = self.param("ls1", nn.initializers.constant(1e-4), (self.dim,), jnp.float32)
        ls2 = self.param("ls2", nn.initializers.constant(1e-4), (self.dim,), jnp.float32)
        y = Affine(self.dtype, name="norm1")(x).swapaxes(1, 2)
        y = nn.Dense(self.seq_len, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_XAVIER,
                     bias_init=_TINY_NORMAL, name="linear_tokens")(y).swapaxes(1, 2)
        x = x + drop_path(self, ls1.astype(y.dtype) * y, self.drop_path_rate, train)
        y = Affine(self.dtype, name="norm2")(x)
        y = Mlp(int(self.dim * self.mlp_ratio), self.dim, dtype=self.dtype, kernel_init=_XAVIER,
                bias_init=_TINY_NORMAL, name="mlp_channels")(y)
        return x + drop_path(self, ls2.astype(y.dtype) * y, self.drop_path_rate, train)


class MlpMixer(nn.Module):
    """timm's MlpMixer; `resmlp=True` builds it with ResBlock and Affine as timm's resmlp_*."""

    num_classes: int = 1000
    img_size: int | Sequence[int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_blocks: int = 8
    embed_dim: int = 512
    mlp_ratio: float | Sequence[float] = (0.5, 4.0)
    drop_path_rate: float = 0.0  # timm's Mixer uses one rate for every block (no decay)
    resmlp: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False, pre_stage: PreStage = None):
        stage_starts = stage_start_blocks(self.num_blocks)
        stage_ends = stage_end_blocks(self.num_blocks)
        check_image(images, to_2tuple(self.img_size), self.in_chans,
                    "ResMLP" if self.resmlp else "MlpMixer")
        x = PatchEmbed(self.embed_dim, self.patch_size, dtype=self.dtype, name="stem")(images)
        x = x.reshape(x.shape[0], -1, self.embed_dim)
        seq_len = x.shape[1]
        stages = []
        for i in range(self.num_blocks):
            if pre_stage is not None and i in stage_starts:
                x = pre_stage(stage_starts.index(i), x)
            if self.resmlp:
                block = ResBlock(self.embed_dim, seq_len, self.mlp_ratio, self.drop_path_rate,
                                 self.dtype, name=f"blocks_{i}")
            else:
                block = MixerBlock(self.embed_dim, seq_len, to_2tuple(self.mlp_ratio),
                                   self.drop_path_rate, self.dtype, name=f"blocks_{i}")
            x = block(x, train)
            if i in stage_ends:
                stages.append(x)
        if self.resmlp:
            x = Affine(self.dtype, name="norm")(x)
        else:
            x = layer_norm(TIMM_LN_EPS, self.dtype, "norm")(x)
        embedding = x.mean(axis=1)
        logits = classifier(self.num_classes, embedding, dtype=self.dtype,
                            kernel_init=nn.initializers.zeros)
        return logits, {"embedding": embedding, "stages": stages}


def _mixer(num_classes: int, resmlp: bool, defaults: dict, overrides: dict) -> MlpMixer:
    kwargs = {**defaults, **overrides}
    for key in ("img_size", "mlp_ratio"):
        if isinstance(kwargs.get(key), list):  # module fields must be hashable
            kwargs[key] = tuple(kwargs[key])
    return MlpMixer(num_classes=num_classes, resmlp=resmlp, **kwargs)


@register_model("mixer_b16_224", family="mlp", mean=INCEPTION_MEAN, std=INCEPTION_STD)
def mixer_b16_224(num_classes: int = 1000, **overrides) -> MlpMixer:
    return _mixer(num_classes, False, dict(patch_size=16, num_blocks=12, embed_dim=768),
                  overrides)


@register_model("resmlp_12_224", family="mlp", mean=IMAGENET_MEAN, std=IMAGENET_STD)
def resmlp_12_224(num_classes: int = 1000, **overrides) -> MlpMixer:
    return _mixer(num_classes, True, dict(patch_size=16, num_blocks=12, embed_dim=384,
                                          mlp_ratio=4.0), overrides)
