"""ConvNeXt laid out as timm 1.0 builds `convnext_tiny` (patch stem, channels-last blocks).

Module names mirror timm keys with '_' for '.': `stages_{i}_blocks_{j}` is timm
`stages.{i}.blocks.{j}`, `stages_{i}_downsample_{0,1}` its LayerNorm2d and 2x2 conv, `head_norm`
timm's `head.norm`; the classifier `head` is timm's `head.fc`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.layers import (TIMM_LN_EPS, TRUNC_NORMAL_02, classifier, conv2d, drop_path,
                                 drop_path_rates, layer_norm)
from jaxkd.models.registry import register_model


# timm's ConvNeXt init: trunc_normal(std=.02) for every conv and linear, zero biases.
def _conv(features, kernel, stride, padding, *, groups=1, dtype, name):
    return conv2d(features, kernel, stride, padding=padding, groups=groups, use_bias=True,
                  kernel_init=TRUNC_NORMAL_02, dtype=dtype, name=name)


def _dense(features, dtype, name):
    return nn.Dense(features, kernel_init=TRUNC_NORMAL_02, dtype=dtype, param_dtype=jnp.float32,
                    name=name)


class ConvNeXtBlock(nn.Module):
    """dw7x7 -> LN -> Linear(4x) -> GELU(erf) -> Linear -> layer scale gamma -> + shortcut."""

    drop_path_rate: float = 0.0
    ls_init_value: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        dim = x.shape[-1]
        y = _conv(dim, 7, 1, 3, groups=dim, dtype=self.dtype, name="conv_dw")(x)
        y = layer_norm(TIMM_LN_EPS, self.dtype, "norm")(y)
        y = _dense(4 * dim, self.dtype, "mlp_fc1")(y)
        y = nn.gelu(y, approximate=False)
        y = _dense(dim, self.dtype, "mlp_fc2")(y)
        gamma = self.param("gamma", nn.initializers.constant(self.ls_init_value), (dim,),
                           jnp.float32)
        y = y * gamma.astype(y.dtype)
        return drop_path(self, y, self.drop_path_rate, train) + x


class ConvNeXt(nn.Module):
    """Stages are the outputs of timm's four ConvNeXtStages (downsample included, strides
    4/8/16/32); the embedding is timm's pre-logits vector: global average pool -> LayerNorm."""

    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    ls_init_value: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, pre_stage=None):
        x = _conv(self.dims[0], 4, 4, 0, dtype=self.dtype, name="stem_0")(x)
        x = layer_norm(TIMM_LN_EPS, self.dtype, "stem_1")(x)
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))  # split per stage
        block_index = 0
        stages = []
        for stage, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if pre_stage is not None:
                x = pre_stage(stage, x)
            if stage > 0:
                x = layer_norm(TIMM_LN_EPS, self.dtype, f"stages_{stage}_downsample_0")(x)
                x = _conv(dim, 2, 2, 0, dtype=self.dtype, name=f"stages_{stage}_downsample_1")(x)
            for i in range(depth):
                x = ConvNeXtBlock(drop_path_rate=rates[block_index],
                                  ls_init_value=self.ls_init_value, dtype=self.dtype,
                                  name=f"stages_{stage}_blocks_{i}")(x, train)
                block_index += 1
            stages.append(x)
        embedding = layer_norm(TIMM_LN_EPS, self.dtype, "head_norm")(jnp.mean(x, axis=(1, 2)))
        logits = classifier(self.num_classes, embedding, kernel_init=TRUNC_NORMAL_02,
                            dtype=self.dtype)
        return logits, {"embedding": embedding, "stages": stages}


@register_model("convnext_tiny", family="cnn")
def convnext_tiny(num_classes: int = 1000, *, depths: Sequence[int] = (3, 3, 9, 3),
                  dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                  ls_init_value: float = 1e-6, dtype: Any = jnp.float32) -> ConvNeXt:
    return ConvNeXt(depths=tuple(depths), dims=tuple(dims), num_classes=num_classes,
                    drop_path_rate=drop_path_rate, ls_init_value=ls_init_value, dtype=dtype)
