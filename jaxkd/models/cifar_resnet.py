"""The CIFAR ResNets of CRD's code base (RepDistiller's models/resnet.py), for 32 px inputs.

A 3x3 stem conv (stride 1) + BN + ReLU, then three stages of BasicBlocks at strides 1, 2, 2
((depth - 2) / 6 blocks each) and a global average pool: `resnet20/56/110` are 16-16-32-64
wide (stem, stages), `resnet8x4/32x4` 32-64-128-256. Every BN starts at weight 1, the convs at
kaiming-normal (fan_out), the classifier at PyTorch's Linear default. Module names are the
original's state-dict keys (`layer{stage}_{index}` is `layer{stage}.{index}`), so its layout is
timm's ResNet layout and jaxkd.convert.resnet's key mapping serves it.

Stages are the outputs of layer1..3 (after the block's ReLU, RepDistiller's `feat[1:4]` with
preact=False); the embedding is the pooled vector (`feat[-1]`). RepDistiller pools with
AvgPool2d(8), the global average at 32 px; here the pool is global at every input size.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.errors import ConfigError
from jaxkd.models.registry import CIFAR_MEAN, CIFAR_STD, register_model
from jaxkd.models.layers import (KAIMING_FAN_OUT, batch_norm, classifier, conv2d,
                                 torch_linear_init)
from jaxkd.models.resnet import BasicBlock

_THIN = (16, 16, 32, 64)  # stem and stage widths of resnet20/56/110
_WIDE = (32, 64, 128, 256)  # ... of resnet8x4/32x4


class CifarResNet(nn.Module):
    depth: int
    widths: Sequence[int]  # stem, stage 1, stage 2, stage 3
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, pre_stage=None):
        blocks = (self.depth - 2) // 6
        x = conv2d(self.widths[0], 3, kernel_init=KAIMING_FAN_OUT, dtype=self.dtype,
                   name="conv1")(x)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        in_channels = self.widths[0]
        stages = []
        for stage, planes in enumerate(self.widths[1:]):
            if pre_stage is not None:
                x = pre_stage(stage, x)
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                x = BasicBlock(planes, stride, stride != 1 or in_channels != planes,
                               zero_init_last=False, dtype=self.dtype,
                               name=f"layer{stage + 1}_{i}")(x, train)
                in_channels = planes
            stages.append(x)
        embedding = jnp.mean(x, axis=(1, 2))
        kernel_init, bias_init = torch_linear_init(in_channels)
        logits = classifier(self.num_classes, embedding, kernel_init=kernel_init,
                            bias_init=bias_init, dtype=self.dtype)
        return logits, {"embedding": embedding, "stages": stages}


def _cifar_resnet(depth: int, widths, num_classes: int, dtype) -> CifarResNet:
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"a CIFAR ResNet of BasicBlocks has depth 6n + 2 (8, 20, 32, 56, "
                          f"110, ...), got {depth}")
    return CifarResNet(depth=depth, widths=widths, num_classes=num_classes, dtype=dtype)


def _register(name: str, default_depth: int, widths):
    @register_model(name, family="cnn", mean=CIFAR_MEAN, std=CIFAR_STD, input_size=32)
    def build(num_classes: int = 100, *, depth: int = default_depth,
              dtype: Any = jnp.float32) -> CifarResNet:
        return _cifar_resnet(depth, widths, num_classes, dtype)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"RepDistiller's {name}: depth {default_depth}, widths {widths} "
                     f"(the `depth` override keeps the widths).")
    return build


resnet20 = _register("resnet20", 20, _THIN)
resnet56 = _register("resnet56", 56, _THIN)
resnet110 = _register("resnet110", 110, _THIN)
resnet8x4 = _register("resnet8x4", 8, _WIDE)
resnet32x4 = _register("resnet32x4", 32, _WIDE)
