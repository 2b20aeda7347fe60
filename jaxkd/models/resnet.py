"""ResNet-18/34/50 laid out exactly as timm 1.0 builds them, so timm weights load one to one."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.layers import (KAIMING_FAN_OUT, batch_norm, classifier, conv2d, drop_path,
                                 max_pool2d, torch_linear_init)
from jaxkd.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs; the last BN starts at zero (timm's zero_init_last) unless
    `zero_init_last=False` (the CIFAR ResNets of jaxkd.models.cifar_resnet start it at one)."""

    planes: int
    stride: int
    downsample: bool
    drop_path_rate: float = 0.0
    zero_init_last: bool = True
    dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        conv = dict(kernel_init=KAIMING_FAN_OUT, dtype=self.dtype)
        y = conv2d(self.planes, 3, self.stride, name="conv1", **conv)(x)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(y))
        y = conv2d(self.planes, 3, name="conv2", **conv)(y)
        y = batch_norm(train, zero_scale=self.zero_init_last, dtype=self.dtype, name="bn2")(y)
        y = drop_path(self, y, self.drop_path_rate, train)
        if self.downsample:
            x = conv2d(self.planes, 1, self.stride, name="downsample_conv", **conv)(x)
            x = batch_norm(train, dtype=self.dtype, name="downsample_bn")(x)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (carries the stride, ResNet v1.5) -> 1x1 with 4x expansion."""

    planes: int
    stride: int
    downsample: bool
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        conv = dict(kernel_init=KAIMING_FAN_OUT, dtype=self.dtype)
        y = conv2d(self.planes, 1, name="conv1", **conv)(x)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(y))
        y = conv2d(self.planes, 3, self.stride, name="conv2", **conv)(y)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(y))
        y = conv2d(self.planes * 4, 1, name="conv3", **conv)(y)
        y = batch_norm(train, zero_scale=True, dtype=self.dtype, name="bn3")(y)
        y = drop_path(self, y, self.drop_path_rate, train)
        if self.downsample:
            x = conv2d(self.planes * 4, 1, self.stride, name="downsample_conv", **conv)(x)
            x = batch_norm(train, dtype=self.dtype, name="downsample_bn")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """timm's default ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages, global average pool.

    Blocks are named `layer{stage}_{index}` (timm `layer{stage}.{index}`); stages are the outputs
    of layer1..layer4 (strides 4, 8, 16, 32); the embedding is the pooled vector.
    """

    block: type[nn.Module]
    layers: Sequence[int]
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, pre_stage=None):
        x = conv2d(64, 7, 2, kernel_init=KAIMING_FAN_OUT, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        x = max_pool2d(x, 3, 2, 1)
        total_blocks = sum(self.layers)
        block_index = 0
        in_channels = 64
        stages = []
        for stage, (num_blocks, planes) in enumerate(zip(self.layers, (64, 128, 256, 512))):
            if pre_stage is not None:
                x = pre_stage(stage, x)
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                out_channels = planes * self.block.expansion
                # timm: drop rate grows linearly over all blocks, 0 for the first.
                rate = self.drop_path_rate * block_index / max(total_blocks - 1, 1)
                x = self.block(planes, stride, stride != 1 or in_channels != out_channels,
                               drop_path_rate=rate, dtype=self.dtype,
                               name=f"layer{stage + 1}_{i}")(x, train)
                in_channels = out_channels
                block_index += 1
            stages.append(x)
        embedding = jnp.mean(x, axis=(1, 2))
        kernel_init, bias_init = torch_linear_init(in_channels)
        logits = classifier(self.num_classes, embedding, kernel_init=kernel_init,
                            bias_init=bias_init, dtype=self.dtype)
        return logits, {"embedding": embedding, "stages": stages}


def _resnet(block, default_layers, num_classes, layers, drop_path_rate, dtype):
    return ResNet(block=block, layers=tuple(layers or default_layers), num_classes=num_classes,
                  drop_path_rate=drop_path_rate, dtype=dtype)


@register_model("resnet18", family="cnn", interpolation="bilinear")
def resnet18(num_classes: int = 1000, *, layers: Sequence[int] | None = None,
             drop_path_rate: float = 0.0, dtype: Any = jnp.float32) -> ResNet:
    return _resnet(BasicBlock, (2, 2, 2, 2), num_classes, layers, drop_path_rate, dtype)


@register_model("resnet34", family="cnn", interpolation="bilinear")
def resnet34(num_classes: int = 1000, *, layers: Sequence[int] | None = None,
             drop_path_rate: float = 0.0, dtype: Any = jnp.float32) -> ResNet:
    return _resnet(BasicBlock, (3, 4, 6, 3), num_classes, layers, drop_path_rate, dtype)


@register_model("resnet50", family="cnn", eval_crop_pct=0.95)
def resnet50(num_classes: int = 1000, *, layers: Sequence[int] | None = None,
             drop_path_rate: float = 0.0, dtype: Any = jnp.float32) -> ResNet:
    return _resnet(Bottleneck, (3, 4, 6, 3), num_classes, layers, drop_path_rate, dtype)
