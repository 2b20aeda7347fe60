"""The wide ResNets of CRD's code base (RepDistiller's models/wrn.py), for 32 px inputs.

WRN-d-k: a 3x3 stem conv (16 channels, no BN after it), three groups of (d - 4) / 6
pre-activation blocks at strides 1, 2, 2 and widths 16k, 32k, 64k, then BN + ReLU, a global
average pool and the classifier. A block is BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus a
shortcut: the input itself when the width is unchanged, else a strided 1x1 conv of the
pre-activated input. Dropout is 0 in every RepDistiller model, so there is none. Convs start at
normal(0, sqrt(2 / (k * k * out))), BN at (1, 0), the classifier at PyTorch's Linear default
with a zero bias.

Module names follow the original's keys: `block{g}_{i}` is `block{g}.layer.{i}`,
`conv_shortcut` is `convShortcut`. Stages are the outputs of block1..3, before the final
BN + ReLU (RepDistiller's `feat[1:4]`, preact=False); the embedding is the pooled vector after
it (`feat[-1]`). RepDistiller pools with avg_pool2d(8), the global average at 32 px; here the
pool is global at every input size.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.errors import ConfigError
from jaxkd.models.registry import CIFAR_MEAN, CIFAR_STD, register_model
from jaxkd.models.layers import KAIMING_FAN_OUT, batch_norm, classifier, conv2d, torch_linear_init

_STEM = 16


class WideBasicBlock(nn.Module):
    out_channels: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = dict(kernel_init=KAIMING_FAN_OUT, dtype=self.dtype)
        activated = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        y = conv2d(self.out_channels, 3, self.stride, name="conv1", **conv)(activated)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(y))
        y = conv2d(self.out_channels, 3, name="conv2", **conv)(y)
        if x.shape[-1] == self.out_channels:
            return x + y
        return conv2d(self.out_channels, 1, self.stride, name="conv_shortcut", **conv)(
            activated) + y


class WideResNet(nn.Module):
    depth: int
    widen_factor: int
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, pre_stage=None):
        blocks = (self.depth - 4) // 6
        x = conv2d(_STEM, 3, kernel_init=KAIMING_FAN_OUT, dtype=self.dtype, name="conv1")(x)
        stages = []
        for group, width in enumerate((16, 32, 64)):
            if pre_stage is not None:
                x = pre_stage(group, x)
            for i in range(blocks):
                x = WideBasicBlock(width * self.widen_factor, 2 if group > 0 and i == 0 else 1,
                                   dtype=self.dtype, name=f"block{group + 1}_{i}")(x, train)
            stages.append(x)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        embedding = jnp.mean(x, axis=(1, 2))
        kernel_init, _ = torch_linear_init(x.shape[-1])
        logits = classifier(self.num_classes, embedding, kernel_init=kernel_init, dtype=self.dtype)
        return logits, {"embedding": embedding, "stages": stages}


def _register(name: str, default_depth: int, default_widen: int):
    @register_model(name, family="cnn", mean=CIFAR_MEAN, std=CIFAR_STD, input_size=32)
    def build(num_classes: int = 100, *, depth: int = default_depth,
              widen_factor: int = default_widen, dtype: Any = jnp.float32) -> WideResNet:
        if depth < 10 or (depth - 4) % 6 or widen_factor < 1:
            raise ConfigError(f"a wide ResNet has depth 6n + 4 (10, 16, 22, 28, 40, ...) and "
                              f"widen_factor >= 1, got depth {depth}, widen_factor "
                              f"{widen_factor}")
        return WideResNet(depth=depth, widen_factor=widen_factor, num_classes=num_classes,
                          dtype=dtype)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"RepDistiller's {name}: WRN-{default_depth}-{default_widen}."
    return build


wrn_40_2 = _register("wrn_40_2", 40, 2)
wrn_16_2 = _register("wrn_16_2", 16, 2)
