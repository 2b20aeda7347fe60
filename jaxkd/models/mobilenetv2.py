"""MobileNetV2 (1.0x) laid out as timm's EfficientNet builder makes `mobilenetv2_100`.

Module names mirror timm keys: `blocks_{stack}_{index}` is timm `blocks.{stack}.{index}`.
The four distillation stages are the maps at strides 4/8/16/32 with 24/32/96/1280 channels:
after stacks 1, 2 and 4, and after conv_head + bn2 (+ ReLU6).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models.layers import batch_norm, classifier, conv2d, drop_path
from jaxkd.models.registry import register_model

# (expansion, out channels, repeats, first stride) of each stack; stack 0 is the depthwise-
# separable block (timm 'ds_r1_k3_s1_c16'), the rest are inverted residuals ('ir_...').
_ARCH = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
         (6, 160, 3, 2), (6, 320, 1, 1))
_STEM = 32
_NUM_FEATURES = 1280
# Stage k (0-based) covers these stacks; the last one also covers conv_head + bn2.
_STAGE_STACKS = ((0, 1), (2,), (3, 4), (5, 6))


def _goog_conv_init(groups: int = 1):
    """timm's _init_weight_goog: normal(0, sqrt(2 / fan_out)), fan_out = k*k*out / groups."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out = shape
        return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (kh * kw * out // groups))

    return init


class DepthwiseSeparable(nn.Module):
    """dw3x3 -> BN+ReLU6 -> pw1x1 -> BN (no activation); residual only when shapes agree."""

    out_channels: int
    stride: int
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        y = conv2d(channels, 3, self.stride, groups=channels, kernel_init=_goog_conv_init(channels),
                   dtype=self.dtype, name="conv_dw")(x)
        y = nn.relu6(batch_norm(train, dtype=self.dtype, name="bn1")(y))
        y = conv2d(self.out_channels, 1, kernel_init=_goog_conv_init(), dtype=self.dtype,
                   name="conv_pw")(y)
        y = batch_norm(train, dtype=self.dtype, name="bn2")(y)
        if self.stride == 1 and channels == self.out_channels:
            y = drop_path(self, y, self.drop_path_rate, train) + x
        return y


class InvertedResidual(nn.Module):
    """pw1x1 expand -> BN+ReLU6 -> dw3x3 -> BN+ReLU6 -> pw1x1 project -> BN (linear)."""

    out_channels: int
    stride: int
    expansion: int
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        mid = channels * self.expansion
        y = conv2d(mid, 1, kernel_init=_goog_conv_init(), dtype=self.dtype, name="conv_pw")(x)
        y = nn.relu6(batch_norm(train, dtype=self.dtype, name="bn1")(y))
        y = conv2d(mid, 3, self.stride, groups=mid, kernel_init=_goog_conv_init(mid),
                   dtype=self.dtype, name="conv_dw")(y)
        y = nn.relu6(batch_norm(train, dtype=self.dtype, name="bn2")(y))
        y = conv2d(self.out_channels, 1, kernel_init=_goog_conv_init(), dtype=self.dtype,
                   name="conv_pwl")(y)
        y = batch_norm(train, dtype=self.dtype, name="bn3")(y)
        if self.stride == 1 and channels == self.out_channels:
            y = drop_path(self, y, self.drop_path_rate, train) + x
        return y


class MobileNetV2(nn.Module):
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, pre_stage=None):
        x = conv2d(_STEM, 3, 2, kernel_init=_goog_conv_init(), dtype=self.dtype,
                   name="conv_stem")(x)
        x = nn.relu6(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        total_blocks = sum(repeats for _, _, repeats, _ in _ARCH)
        block_index = 0
        stages = []
        for stage, stacks in enumerate(_STAGE_STACKS):
            if pre_stage is not None:
                x = pre_stage(stage, x)
            for stack in stacks:
                expansion, out_channels, repeats, first_stride = _ARCH[stack]
                for i in range(repeats):
                    # timm's EfficientNetBuilder: rate * block_index / block_count.
                    kw = dict(out_channels=out_channels, stride=first_stride if i == 0 else 1,
                              drop_path_rate=self.drop_path_rate * block_index / total_blocks,
                              dtype=self.dtype, name=f"blocks_{stack}_{i}")
                    if stack == 0:
                        x = DepthwiseSeparable(**kw)(x, train)
                    else:
                        x = InvertedResidual(expansion=expansion, **kw)(x, train)
                    block_index += 1
            if stage == len(_STAGE_STACKS) - 1:
                x = conv2d(_NUM_FEATURES, 1, kernel_init=_goog_conv_init(), dtype=self.dtype,
                           name="conv_head")(x)
                x = nn.relu6(batch_norm(train, dtype=self.dtype, name="bn2")(x))
            stages.append(x)
        embedding = jnp.mean(x, axis=(1, 2))
        # timm: uniform(+-1/sqrt(fan_out)) kernel, zero bias.
        kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")
        logits = classifier(self.num_classes, embedding, kernel_init=kernel_init, dtype=self.dtype)
        return logits, {"embedding": embedding, "stages": stages}


@register_model("mobilenetv2_100", family="cnn")
def mobilenetv2_100(num_classes: int = 1000, *, drop_path_rate: float = 0.0,
                    dtype: Any = jnp.float32) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, drop_path_rate=drop_path_rate, dtype=dtype)
