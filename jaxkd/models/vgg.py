"""The VGGs of CRD's code base (RepDistiller's models/vgg.py with batch norm), for 32 px inputs.

Five blocks of 3x3 convs (with bias) + BN + ReLU; the ReLU after a block's last BN is applied
outside the block. Between blocks 2x2 max-pools, except that the pool before block 4 runs only
for 64 px inputs (the original's `if h == 64`): at 32 px blocks 3 and 4 both see 4x4 maps.
Then a global average pool and Linear(512, classes). `vgg8` has one conv per block (64, 128,
256, 512, 512), `vgg13` two. RepDistiller's `vgg8`/`vgg13` are its `vgg8_bn`/`vgg13_bn`.
Convs start at normal(0, sqrt(2 / (k * k * out))) with zero bias, BN at (1, 0), the classifier
at normal(0, 0.01) with zero bias.

Module names: `block{b}_conv{j}` / `block{b}_bn{j}` are the original's `block{b}.{3j}` /
`block{b}.{3j + 1}`. Stages are the outputs of blocks 1-4 after their ReLU (RepDistiller's
`feat[1:5]`, preact=False; block 0 is the stem); the embedding is the pooled vector
(`feat[-1]`). The `pre_stage(i, x)` hook sees block i's output, before the pool that opens
stage i + 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.registry import CIFAR_MEAN, CIFAR_STD, register_model
from jaxkd.models.layers import KAIMING_FAN_OUT, batch_norm, classifier, conv2d, max_pool2d

_VGG8 = ((64,), (128,), (256,), (512,), (512,))
_VGG13 = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))
# The input height at which the original also pools before block 4.
_POOL_BEFORE_LAST_AT = 64


class VGG(nn.Module):
    blocks: Sequence[Sequence[int]]
    num_classes: int = 100
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, pre_stage=None):
        pool_before_last = x.shape[1] == _POOL_BEFORE_LAST_AT
        stages = []
        for b, widths in enumerate(self.blocks):
            if b > 0:
                if pre_stage is not None:
                    x = pre_stage(b - 1, x)
                if b < len(self.blocks) - 1 or pool_before_last:
                    x = max_pool2d(x, 2, 2, 0)
            for j, width in enumerate(widths):
                x = conv2d(width, 3, use_bias=True, kernel_init=KAIMING_FAN_OUT,
                           dtype=self.dtype, name=f"block{b}_conv{j}")(x)
                x = nn.relu(batch_norm(train, dtype=self.dtype, name=f"block{b}_bn{j}")(x))
            if b > 0:
                stages.append(x)
        embedding = jnp.mean(x, axis=(1, 2))
        logits = classifier(self.num_classes, embedding, kernel_init=nn.initializers.normal(0.01),
                            dtype=self.dtype)
        return logits, {"embedding": embedding, "stages": stages}


@register_model("vgg8", family="cnn", mean=CIFAR_MEAN, std=CIFAR_STD, input_size=32)
def vgg8(num_classes: int = 100, *, dtype: Any = jnp.float32) -> VGG:
    """RepDistiller's vgg8 (vgg8_bn, configuration 'S')."""
    return VGG(blocks=_VGG8, num_classes=num_classes, dtype=dtype)


@register_model("vgg13", family="cnn", mean=CIFAR_MEAN, std=CIFAR_STD, input_size=32)
def vgg13(num_classes: int = 100, *, dtype: Any = jnp.float32) -> VGG:
    """RepDistiller's vgg13 (vgg13_bn, configuration 'B')."""
    return VGG(blocks=_VGG13, num_classes=num_classes, dtype=dtype)
