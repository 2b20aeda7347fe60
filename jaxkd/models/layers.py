"""Layers and initialisers shared by every model family and by the method modules.

Each one computes what its PyTorch/timm counterpart computes (REFERENCE.md section 2), so that
one definition serves ResNet, MobileNetV2, ConvNeXt, ViT, Swin, Mixer and the distillation
heads: a convolution with PyTorch's symmetric padding (whose depthwise case is lowered per
backend, see `depthwise_conv2d`), a BatchNorm whose running variance is updated as
`torch.nn.BatchNorm*d` updates it, LayerNorm with the two-pass variance, timm's stochastic
depth, and the initialisers the official code uses.
"""

from __future__ import annotations

import functools
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
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _layer_norm(x, scale, bias, eps: float, out_dtype, x_dtype):
    return _layer_norm_forward(x, scale, bias, eps, out_dtype, x_dtype)[0]


def _layer_norm_forward(x, scale, bias, eps, out_dtype, x_dtype):
    """(output, residuals); the residuals' float32 normalised input stands in for `x`."""
    del x_dtype  # the backward's
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    centred = x32 - x32.mean(-1, keepdims=True)
    inv_std = lax.rsqrt(lax.square(centred).mean(-1, keepdims=True) + eps)
    normed = centred * inv_std
    out = (normed * scale + bias).astype(out_dtype)
    return out, (normed, inv_std, scale)


def _layer_norm_backward(eps, out_dtype, x_dtype, residuals, grad):
    """The closed-form LayerNorm gradient from the saved normalised input: XLA's CPU fusion of
    the autodiff graph recomputes the normalisation inside every consumer (a ViT step spends
    a quarter of its time there)."""
    del eps, out_dtype
    normed, inv_std, scale = residuals
    grad = grad.astype(normed.dtype)
    batch_axes = tuple(range(grad.ndim - 1))
    grad_normed = grad * scale
    grad_x = inv_std * (grad_normed - grad_normed.mean(-1, keepdims=True)
                        - normed * (grad_normed * normed).mean(-1, keepdims=True))
    return (grad_x.astype(x_dtype), (grad * normed).sum(batch_axes).astype(scale.dtype),
            grad.sum(batch_axes).astype(scale.dtype))


_layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis: two-pass variance (the fast E[x^2]-E[x]^2 form
    drifts), statistics in at least float32, output in `dtype` (None: the input's, promoted
    to float32), and a closed-form backward. Variables as Flax's nn.LayerNorm (`scale`,
    `bias`), so converted checkpoints are unchanged. Reverse-mode differentiable only."""

    epsilon: float
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        out_dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
        return _layer_norm(x, scale, bias, self.epsilon, jnp.dtype(out_dtype), x.dtype)


def layer_norm(eps: float, dtype: Any, name: str | None = None) -> LayerNorm:
    return LayerNorm(epsilon=eps, dtype=dtype, name=name)


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
            stats_dtype = x.dtype if self.dtype is None else self.dtype
            stats = x.astype(jnp.promote_types(stats_dtype, jnp.float32))
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
        return y.astype(jnp.result_type(x, scale, bias) if self.dtype is None else self.dtype)


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
    A depthwise conv (groups == in channels == features) goes through `depthwise_conv2d`,
    which picks the fastest lowering of the backend; every other conv is XLA's.
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
        dtype = jnp.result_type(x, kernel) if self.dtype is None else self.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if 1 < self.groups == in_features == self.features:
            y = depthwise_conv2d(x, kernel, strides, padding)
        else:
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


# --- depthwise convolution ---------------------------------------------------------------
# Lowering of a depthwise conv per JAX backend ("xla" where a backend is not listed), chosen by
# measurement (docs/benchmarks.md, scripts/depthwise_benchmark.py): XLA's CPU convolution with
# feature_group_count = channels is 6-50x slower than the same conv written as kh * kw
# shifted multiply-adds, forward and backward. GPUs keep XLA's (cuDNN) convolution.
DEPTHWISE_LOWERING = {"cpu": "shifted"}
LOWERINGS = ("xla", "shifted")


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                     padding: tuple[int, int], lowering: str | None = None) -> jax.Array:
    """y[b, i, j, c] = sum_{u, v} x_padded[b, s_h i + u, s_w j + v, c] * kernel[u, v, 0, c].

    x [B, H, W, C], kernel [kh, kw, 1, C] (HWIO), symmetric zero padding (p_h, p_w). Both
    lowerings give the same values to float32 rounding; `lowering` None picks the backend's
    (DEPTHWISE_LOWERING).
    """
    if lowering is None:
        lowering = DEPTHWISE_LOWERING.get(jax.default_backend(), "xla")
    if lowering == "xla":
        return lax.conv_general_dilated(x, kernel, strides, [(p, p) for p in padding],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])
    if lowering == "shifted":
        return _shifted_depthwise(x, kernel, tuple(strides), tuple(padding))
    raise ValueError(f"unknown depthwise lowering {lowering!r}; choose one of {LOWERINGS}")


def _output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _tap(padded, u: int, v: int, strides, out_hw):
    """The [B, Ho, Wo, C] input values kernel tap (u, v) multiplies (stride applied)."""
    b, _, _, c = padded.shape
    return lax.slice(padded, (0, u, v, 0),
                     (b, u + strides[0] * (out_hw[0] - 1) + 1,
                      v + strides[1] * (out_hw[1] - 1) + 1, c), (1, strides[0], strides[1], 1))


def _correlate(padded, kernel, strides, out_hw):
    """sum over taps of tap * kernel[u, v, 0], accumulated in at least float32, one pass."""
    acc_dtype = jnp.promote_types(padded.dtype, jnp.float32)
    out = None
    for u in range(kernel.shape[0]):
        for v in range(kernel.shape[1]):
            term = (_tap(padded, u, v, strides, out_hw).astype(acc_dtype)
                    * kernel[u, v, 0].astype(acc_dtype))
            out = term if out is None else out + term
    # An exact identity that XLA's CPU matmul (YNNPACK) fusion cannot absorb: without it that
    # fusion pulls the sum into the next matmul's fusion and materialises each of the kh * kw
    # taps as a copy of the input; with it the taps stay one fused pass.
    finfo = jnp.finfo(acc_dtype)
    out = lax.reduce_precision(out, exponent_bits=finfo.nexp, mantissa_bits=finfo.nmant)
    return out.astype(padded.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_depthwise(x, kernel, strides, padding):
    (ph, pw), (kh, kw) = padding, kernel.shape[:2]
    out_hw = (_output_size(x.shape[1], kh, strides[0], ph),
              _output_size(x.shape[2], kw, strides[1], pw))
    padded = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    return _correlate(padded, kernel, strides, out_hw)


def _shifted_depthwise_fwd(x, kernel, strides, padding):
    return _shifted_depthwise(x, kernel, strides, padding), (x, kernel)


def _shifted_depthwise_bwd(strides, padding, residuals, grad):
    """Both gradients as cache-friendly shifted sums (autodiff's transposes are 5-10x slower).

    Input: the output gradient dilated by the stride and padded to a 'full' correlation with
    the flipped kernel. Kernel: one scan over output rows, each step summing every tap's
    products over that row only, so the rows it reads stay in cache.
    """
    x, kernel = residuals
    (sh, sw), (ph, pw), (kh, kw) = strides, padding, kernel.shape[:2]
    b, h, w, c = x.shape
    ho, wo = grad.shape[1:3]
    zero = jnp.zeros((), grad.dtype)
    dilated = lax.pad(grad, zero, ((0, 0, 0), (kh - 1 - ph, h + ph - sh * (ho - 1) - 1, sh - 1),
                                   (kw - 1 - pw, w + pw - sw * (wo - 1) - 1, sw - 1), (0, 0, 0)))
    dx = _correlate(dilated, kernel[::-1, ::-1], (1, 1), (h, w))

    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    padded = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0))).astype(acc_dtype)

    def row(acc, inputs):
        i, grad_row = inputs  # grad_row [B, Wo, C]: output row i
        rows = lax.dynamic_slice_in_dim(padded, i * sh, kh, axis=1)
        sums = [jnp.sum(_tap(rows[:, u:u + 1], 0, v, (1, sw), (1, wo))[:, 0] * grad_row,
                        axis=1) for u in range(kh) for v in range(kw)]
        return acc + jnp.stack(sums, axis=1), None

    grad_rows = jnp.moveaxis(grad.astype(acc_dtype), 1, 0)
    per_example, _ = lax.scan(row, jnp.zeros((b, kh * kw, c), acc_dtype),
                              (jnp.arange(ho), grad_rows))
    dkernel = per_example.sum(axis=0).reshape(kh, kw, 1, c)
    return dx, dkernel.astype(kernel.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


# --- max pooling ---------------------------------------------------------------------------
# Backward of a max pool per JAX backend ("xla" where a backend is not listed), chosen by
# measurement (docs/benchmarks.md): XLA's CPU select-and-scatter takes 93 ms for ResNet's
# 3x3/2 pool on [8, 112, 112, 64], the tap-by-tap routing below 19 ms.
MAX_POOL_BACKWARD = {"cpu": "taps"}
MAX_POOL_BACKWARDS = ("xla", "taps")


def max_pool2d(x: jax.Array, kernel: int, stride: int, padding: int,
               backward: str | None = None) -> jax.Array:
    """torch.nn.MaxPool2d(kernel, stride, padding) on NHWC: padding never wins a window, and
    the gradient goes to the first maximum of each window in row-major order (PyTorch's and
    XLA's choice on ties); `backward` None picks the backend's (MAX_POOL_BACKWARD)."""
    if backward is None:
        backward = MAX_POOL_BACKWARD.get(jax.default_backend(), "xla")
    if backward == "xla":
        return _xla_max_pool(x, kernel, stride, padding)
    if backward == "taps":
        return _tap_routed_max_pool(x, kernel, stride, padding)
    raise ValueError(f"unknown max-pool backward {backward!r}; choose one of "
                     f"{MAX_POOL_BACKWARDS}")


def _xla_max_pool(x, kernel, stride, padding):
    return nn.max_pool(x, (kernel, kernel), (stride, stride),
                       padding=((padding, padding), (padding, padding)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _tap_routed_max_pool(x, kernel, stride, padding):
    return _xla_max_pool(x, kernel, stride, padding)


def _tap_routed_max_pool_fwd(x, kernel, stride, padding):
    return _xla_max_pool(x, kernel, stride, padding), x


def _tap_routed_max_pool_bwd(kernel, stride, padding, x, grad):
    """Each window's gradient to its first maximum: the window's first arg-max tap in
    row-major order, found again here (comparing with the forward's output instead would
    route nothing wherever XLA recomputes the input with other rounding), then each tap's
    share scattered back to its positions by padding."""
    _, h, w, _ = x.shape
    ho, wo = grad.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                     constant_values=-jnp.inf)
    taps = [(u, v) for u in range(kernel) for v in range(kernel)]
    best = _tap(padded, 0, 0, (stride, stride), (ho, wo))
    first = jnp.zeros(grad.shape, jnp.int32)
    for index, (u, v) in enumerate(taps[1:], start=1):
        value = _tap(padded, u, v, (stride, stride), (ho, wo))
        larger = value > best
        best = jnp.where(larger, value, best)
        first = jnp.where(larger, index, first)
    zero = jnp.zeros((), grad.dtype)
    dx = None
    for index, (u, v) in enumerate(taps):
        routed = lax.pad(jnp.where(first == index, grad, zero), zero, (
            (0, 0, 0), (u, h + 2 * padding - u - stride * (ho - 1) - 1, stride - 1),
            (v, w + 2 * padding - v - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)))
        dx = routed if dx is None else dx + routed
    return (dx[:, padding:padding + h, padding:padding + w],)


_tap_routed_max_pool.defvjp(_tap_routed_max_pool_fwd, _tap_routed_max_pool_bwd)


def classifier(num_classes: int, embedding: jax.Array, **dense_kwargs) -> jax.Array:
    """The classifier `head` on the pre-logits embedding (called inside a compact module).
    With num_classes 0 there is none and the embedding comes back, as timm's identity head:
    a headless backbone (a self-supervised teacher) for methods that read no logits."""
    if not num_classes:
        return embedding
    return nn.Dense(num_classes, param_dtype=jnp.float32, name="head", **dense_kwargs)(embedding)
