"""Layers and initialisers shared by every model family and by the method modules.

Each one computes what its PyTorch/timm counterpart computes (REFERENCE.md section 2), so that
one definition serves ResNet, MobileNetV2, ConvNeXt, ViT, Swin, Mixer and the distillation
heads: a convolution with PyTorch's symmetric padding, a BatchNorm whose running variance is
updated as `torch.nn.BatchNorm*d` updates it, LayerNorm with the two-pass variance, timm's
stochastic depth, and the initialisers the official code uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# --- constants ---------------------------------------------------------------------------
BN_MOMENTUM = 0.9  # Flax convention (weight of the old value): PyTorch's momentum 0.1.
BN_EPS = 1e-5  # torch.nn.BatchNorm*d's default
TORCH_LN_EPS = 1e-5  # torch.nn.LayerNorm's default: Swin and the official method modules
TIMM_LN_EPS = 1e-6  # timm's ViT, DeiT, Mixer and ConvNeXt norms

# timm's CNN init (ResNet) and the official method code's: kaiming_normal_(mode='fan_out',
# nonlinearity='relu') on every conv.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# timm's transformer / ConvNeXt init and the method heads': trunc_normal_(std=.02).
TRUNC_NORMAL_02 = nn.initializers.truncated_normal(0.02)

IntPair = int | Sequence[int]


def _pair(value: IntPair) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


# --- initialisers ------------------------------------------------------------------------
def torch_linear_init(fan_in: int) -> tuple[Callable, Callable]:
    """PyTorch's default nn.Linear init (kernel and bias uniform in +-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), bias_init


# --- stochastic depth --------------------------------------------------------------------
def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
    """timm's DropPath: drop whole residual branches per sample, rescaling kept ones by 1/keep."""
    if not train or rate == 0.0:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """timm's stochastic depth decay rule: linear from 0 at the first block to `rate`."""
    return [float(r) for r in np.linspace(0.0, rate, depth)]


# --- normalisation -----------------------------------------------------------------------
def layer_norm(eps: float, dtype: Any, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with PyTorch's two-pass variance (the fast E[x^2]-E[x]^2 form drifts)."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm1d/2d on the feature axis `axis`.

    Training normalises with the biased batch variance and updates the running variance with
    the unbiased one (n / (n - 1) times it, n the values per feature), as PyTorch does; Flax's
    nn.BatchNorm stores the biased one. Statistics are two-pass, in at least float32, over
    every axis but `axis` of the whole (global) batch. The variables are Flax's (`mean`, `var`
    in 'batch_stats'; `scale`, `bias` in 'params'), so converted checkpoints are unchanged.
    """

    use_running_average: bool
    axis: int = -1
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        feature_axis = self.axis % x.ndim
        reduction_axes = tuple(i for i in range(x.ndim) if i != feature_axis)
        features = x.shape[feature_axis]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            stats = x.astype(jnp.promote_types(self.dtype or x.dtype, jnp.float32))
            mean = stats.mean(reduction_axes)
            var = lax.square(stats - jnp.expand_dims(mean, reduction_axes)).mean(reduction_axes)
            if not self.is_initializing():
                count = x.size // features
                if count < 2:
                    raise ValueError(f"BatchNorm in training needs more than one value per "
                                     f"feature, got input shape {x.shape} (as PyTorch's)")
                unbiased = var * (count / (count - 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        shape = [1] * x.ndim
        shape[feature_axis] = features
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
        # Flax's arithmetic, so that outputs stay bit-identical with nn.BatchNorm's.
        y = x - mean.reshape(shape)
        y = y * (lax.rsqrt(var.reshape(shape) + self.epsilon) * scale.reshape(shape))
        y = y + bias.reshape(shape)
        return y.astype(self.dtype or jnp.result_type(x, scale, bias))


def batch_norm(train: bool, *, axis: int = -1, eps: float = BN_EPS, zero_scale: bool = False,
               dtype: Any = jnp.float32, name: str | None = None) -> BatchNorm:
    """PyTorch's BatchNorm (momentum 0.1); `zero_scale` starts the scale at 0 (timm's
    zero_init_last)."""
    return BatchNorm(use_running_average=not train, axis=axis, epsilon=eps, dtype=dtype,
                     scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                     name=name)


# --- convolution -------------------------------------------------------------------------
class Conv2d(nn.Module):
    """torch.nn.Conv2d on NHWC maps: explicit symmetric zero padding (never 'SAME'), groups.

    Variables as Flax's nn.Conv: `kernel` [kh, kw, in / groups, features] (HWIO), `bias`.
    """

    features: int
    kernel_size: IntPair
    strides: IntPair = 1
    padding: IntPair = 0
    groups: int = 1
    use_bias: bool = False
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(f"groups={self.groups} does not divide {in_features} input and "
                             f"{self.features} output channels")
        kernel_size, strides, padding = (_pair(v) for v in (self.kernel_size, self.strides,
                                                            self.padding))
        kernel = self.param("kernel", self.kernel_init,
                            kernel_size + (in_features // self.groups, self.features),
                            self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, kernel)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        y = lax.conv_general_dilated(x, kernel, strides, [(p, p) for p in padding],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=self.groups)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype).reshape(1, 1, 1, -1)
        return y


def conv2d(features: int, kernel: IntPair, stride: IntPair = 1, *, padding: IntPair | None = None,
           groups: int = 1, use_bias: bool = False,
           kernel_init: Callable = nn.initializers.lecun_normal(),
           bias_init: Callable = nn.initializers.zeros, dtype: Any = jnp.float32,
           name: str | None = None) -> Conv2d:
    """A PyTorch-equivalent Conv2d; padding defaults to (k - 1) // 2 per side (timm's)."""
    if padding is None:
        padding = tuple((k - 1) // 2 for k in _pair(kernel))
    return Conv2d(features, kernel, stride, padding, groups=groups, use_bias=use_bias,
                  kernel_init=kernel_init, bias_init=bias_init, dtype=dtype, name=name)
