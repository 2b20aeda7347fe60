"""CycleMLP as the official OFA-KD code defines it (custom_model/cycle_mlp.py, `CycleNet`).

A 7x7 stride-4 conv stem, then four stages of CycleBlocks on NHWC maps with a 3x3 stride-2 conv
between stages; a final LayerNorm and the mean of the tokens feed the classifier. Each block
mixes space with two CycleFCs and channels with a Linear, weighted per channel by a small MLP,
then applies a channel MLP.

The original's CycleFC is torchvision's `deform_conv2d` with a 1x1 kernel and a fixed integer
offset per input channel: it samples channel c at (i + dy_c, j + dx_c), zero outside the map,
and applies a dense layer over channels. That is computed here as exactly that shift followed by
a 1x1 conv. The offsets follow from the channel count (`cycle_offsets`); the original keeps
them in its state dicts, which jaxkd.convert.cyclemlp checks and writes back.

Module names: `stages_{s}_blocks_{j}` is the original's `network.{2s}.{j}`,
`stages_{s}_downsample` its `network.{2s - 1}` (s >= 1), the other names are its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkd.models.layers import (TORCH_LN_EPS, TRUNC_NORMAL_02, classifier, conv2d, drop_path,
                                 drop_path_rates, layer_norm, torch_linear_init)
from jaxkd.models.registry import IMAGENET_MEAN, IMAGENET_STD, register_model
from jaxkd.models.vit import Mlp, PreStage, check_image, to_2tuple

# The spatial extent (kernel_size in the original) of each block's two CycleFCs, by name.
CYCLE_FC_EXTENTS = {"sfc_h": (1, 3), "sfc_w": (3, 1)}


def cycle_offsets(channels: int, extent: tuple[int, int]) -> np.ndarray:
    """[channels, 2] integer (dy, dx) by which CycleFC samples each input channel, by the rule
    of the original's `gen_offset`: with k the extent's long side, channel c moves by
    (c + k // 2) % k - k // 2 along that side and not along the other."""
    if min(extent) != 1:
        raise ValueError(f"a CycleFC extent is 1 x k or k x 1, got {extent}")
    k = max(extent)
    shifts = (np.arange(channels) + k // 2) % k - k // 2
    offsets = np.zeros((channels, 2), np.int64)
    offsets[:, 0 if extent[0] > 1 else 1] = shifts
    return offsets


def shift_channels(x: jax.Array, offsets: np.ndarray) -> jax.Array:
    """y[b, i, j, c] = x[b, i + dy_c, j + dx_c, c], zero where that falls outside the map.

    This is what deform_conv2d samples for integer offsets: its bilinear weights are 1 on that
    pixel and 0 on the others, and it reads 0 outside the map.
    """
    out = jnp.zeros_like(x)
    for dy, dx in sorted({tuple(int(d) for d in o) for o in offsets}):
        # Negative padding crops: the map moved by (-dy, -dx), zero-filled, same size.
        shifted = lax.pad(x, jnp.zeros((), x.dtype),
                          ((0, 0, 0), (-dy, dy, 0), (-dx, dx, 0), (0, 0, 0)))
        out = jnp.where(np.all(offsets == (dy, dx), axis=1), shifted, out)
    return out


class CycleMLP(nn.Module):
    """The token mixer: CycleFC along W (`sfc_h`), along H (`sfc_w`) and a channel Linear
    (`mlp_c`), summed with per-channel softmax weights a `reweight` MLP computes from the
    spatial mean of their sum, then `proj`."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    def _cycle_fc(self, x, name):
        fc = conv2d(self.dim, 1, padding=0, use_bias=True, kernel_init=TRUNC_NORMAL_02,
                    dtype=self.dtype, name=name)
        return fc(shift_channels(x, cycle_offsets(x.shape[-1], CYCLE_FC_EXTENTS[name])))

    @nn.compact
    def __call__(self, x):
        batch, _, _, dim = x.shape
        dense = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=TRUNC_NORMAL_02)
        h = self._cycle_fc(x, "sfc_h")
        w = self._cycle_fc(x, "sfc_w")
        c = nn.Dense(dim, use_bias=False, name="mlp_c", **dense)(x)
        a = (h + w + c).mean(axis=(1, 2))
        a = Mlp(dim // 4, 3 * dim, dtype=self.dtype, name="reweight")(a)
        # The original reshapes to [B, C, 3]: branch k of channel c is output 3c + k.
        a = jax.nn.softmax(a.reshape(batch, 1, 1, dim, 3).astype(jnp.float32), axis=-1)
        a = a.astype(h.dtype)
        x = h * a[..., 0] + w * a[..., 1] + c * a[..., 2]
        return nn.Dense(dim, name="proj", **dense)(x)


class CycleBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)), on an NHWC map."""

    dim: int
    mlp_ratio: float
    drop_path_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        y = layer_norm(TORCH_LN_EPS, self.dtype, "norm1")(x)
        y = CycleMLP(self.dim, self.dtype, name="attn")(y)
        x = x + drop_path(self, y, self.drop_path_rate, train)
        y = layer_norm(TORCH_LN_EPS, self.dtype, "norm2")(x)
        y = Mlp(int(self.dim * self.mlp_ratio), self.dim, dtype=self.dtype, name="mlp")(y)
        return x + drop_path(self, y, self.drop_path_rate, train)


def _torch_conv(features: int, kernel: int, stride: int, padding: int, in_features: int,
                dtype, name: str):
    """A conv with PyTorch's default init, which the original leaves its stem and
    downsampling convs at."""
    kernel_init, bias_init = torch_linear_init(in_features * kernel * kernel)
    return conv2d(features, kernel, stride, padding=padding, use_bias=True,
                  kernel_init=kernel_init, bias_init=bias_init, dtype=dtype, name=name)


class CycleNet(nn.Module):
    """The original CycleNet for classification (its `fork_feat=False` build).

    Stages are the outputs of the four block sequences (network entries 0, 2, 4, 6), NHWC at
    strides 4/8/16/32, before the downsampling that follows; `pre_stage` sees each stage's
    input after its downsampling. The embedding is the token mean after the final LayerNorm.
    """

    num_classes: int = 1000
    img_size: int | Sequence[int] = 224
    layers: Sequence[int] = (3, 4, 18, 3)
    embed_dims: Sequence[int] = (64, 128, 320, 512)
    mlp_ratios: Sequence[float] = (8, 8, 4, 4)
    drop_path_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False, pre_stage: PreStage = None):
        if not len(self.layers) == len(self.embed_dims) == len(self.mlp_ratios) == 4:
            raise ValueError(f"CycleNet here has 4 stages: got layers={self.layers}, "
                             f"embed_dims={self.embed_dims}, mlp_ratios={self.mlp_ratios}")
        check_image(images, to_2tuple(self.img_size), 3, type(self).__name__)
        x = _torch_conv(self.embed_dims[0], 7, 4, 2, 3, self.dtype, "patch_embed")(
            images.astype(self.dtype))
        # The original's per-block rule: rate * (global block index) / (number of blocks - 1).
        rates = drop_path_rates(self.drop_path_rate, sum(self.layers))
        stages = []
        for s, (depth, dim, ratio) in enumerate(zip(self.layers, self.embed_dims,
                                                    self.mlp_ratios)):
            if s > 0:
                x = _torch_conv(dim, 3, 2, 1, self.embed_dims[s - 1], self.dtype,
                                f"stages_{s}_downsample")(x)
            if pre_stage is not None:
                x = pre_stage(s, x)
            first = sum(self.layers[:s])
            for j in range(depth):
                x = CycleBlock(dim, ratio, rates[first + j], self.dtype,
                               name=f"stages_{s}_blocks_{j}")(x, train)
            stages.append(x)
        x = layer_norm(TORCH_LN_EPS, self.dtype, "norm")(x)
        embedding = x.mean(axis=(1, 2))
        logits = classifier(self.num_classes, embedding, dtype=self.dtype,
                            kernel_init=TRUNC_NORMAL_02)
        return logits, {"embedding": embedding, "stages": stages}


@register_model("cyclemlp_b3", family="mlp", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                eval_crop_pct=0.9, token_stages=False)
def cyclemlp_b3(num_classes: int = 1000, **overrides) -> CycleNet:
    """CycleMLP-B3 (the original's CycleMLP_B3); overrides use its keyword names."""
    kwargs = {**dict(layers=(3, 4, 18, 3), embed_dims=(64, 128, 320, 512),
                     mlp_ratios=(8, 8, 4, 4)), **overrides}
    for key in ("layers", "embed_dims", "mlp_ratios", "img_size"):
        if isinstance(kwargs.get(key), list):  # module fields must be hashable
            kwargs[key] = tuple(kwargs[key])
    return CycleNet(num_classes=num_classes, **kwargs)
