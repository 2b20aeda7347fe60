"""The shared layers (jaxkd.models.layers) against PyTorch and against each other."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxkd import sharding
from jaxkd.models import layers

# (input shape, kernel, stride, padding): MobileNetV2's and OFA's 3x3 s1/s2, ConvNeXt's 7x7,
# PAT's 5x5, and odd sizes where a stride-2 window does not reach the last row/column.
DEPTHWISE_CASES = [((2, 9, 9, 6), 3, 1, 1), ((2, 10, 9, 6), 3, 2, 1), ((2, 11, 11, 5), 7, 1, 3),
                   ((2, 8, 8, 4), 5, 1, 2), ((2, 8, 8, 3), 3, 2, 0)]


def _normal(seed, shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _lowered(lowering, strides, padding):
    return lambda x, kernel: layers.depthwise_conv2d(x, kernel, strides, padding, lowering)


@pytest.mark.parametrize("shape,kernel,stride,pad", DEPTHWISE_CASES)
def test_shifted_depthwise_equals_xla_forward_and_gradients(shape, kernel, stride, pad):
    x = _normal(0, shape)
    w = _normal(1, (kernel, kernel, 1, shape[-1]))
    outputs, grads = {}, {}
    for lowering in layers.LOWERINGS:
        conv = _lowered(lowering, (stride, stride), (pad, pad))
        outputs[lowering] = jax.jit(conv)(x, w)
        cotangent = _normal(2, outputs[lowering].shape)
        grads[lowering] = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) * cotangent),
                                           argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(outputs["shifted"], outputs["xla"], rtol=1e-5, atol=1e-5)
    for shifted, xla in zip(grads["shifted"], grads["xla"]):
        assert shifted.shape == xla.shape
        np.testing.assert_allclose(shifted, xla, rtol=1e-5, atol=2e-5)


def test_shifted_depthwise_keeps_bfloat16_and_accumulates_in_float32():
    x, w = _normal(0, (2, 8, 8, 4)), _normal(1, (7, 7, 1, 4))
    reference = _lowered("xla", (1, 1), (3, 3))(x, w)
    y = _lowered("shifted", (1, 1), (3, 3))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    # bf16 inputs (8 bits of mantissa each) and one final rounding, not 49 bf16 additions.
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(y.astype(jnp.float32) - reference))) <= 0.02 * scale


def test_unknown_depthwise_lowering_is_refused():
    with pytest.raises(ValueError, match="unknown depthwise lowering 'im2col'"):
        layers.depthwise_conv2d(_normal(0, (1, 4, 4, 2)), _normal(1, (3, 3, 1, 2)), (1, 1),
                                (1, 1), "im2col")


def test_cpu_lowers_depthwise_convs_without_xla_grouped_convolution():
    conv = layers.conv2d(6, 3, 2, groups=6)
    x = _normal(0, (2, 8, 8, 6))
    variables = conv.init(jax.random.PRNGKey(0), x)
    assert jax.default_backend() == "cpu"
    step = jax.grad(lambda v: jnp.sum(conv.apply(v, x) ** 2))
    assert "conv_general_dilated" not in str(jax.make_jaxpr(step)(variables))
    dense = layers.conv2d(6, 3, 2, groups=3)  # grouped, not depthwise: XLA's convolution
    assert "conv_general_dilated" in str(jax.make_jaxpr(dense.init)(jax.random.PRNGKey(0), x))


@pytest.mark.parametrize("groups,stride,kernel", [(1, 2, 3), (6, 2, 3), (6, 1, 5), (2, 2, 4)])
def test_conv2d_matches_torch_with_symmetric_padding(groups, stride, kernel):
    """PyTorch pads k // 2 on both sides, also at stride 2 on an even map (Flax 'SAME' would
    pad only after); variables are Flax nn.Conv's, so conversion is unchanged."""
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(6, 6, kernel, stride, padding=(kernel - 1) // 2, groups=groups)
    images = torch.randn(2, 6, 10, 10)
    with torch.no_grad():
        expected = ref(images).permute(0, 2, 3, 1).numpy()
    conv = layers.conv2d(6, kernel, stride, groups=groups, use_bias=True)
    params = {"kernel": jnp.asarray(ref.weight.detach().permute(2, 3, 1, 0).numpy()),
              "bias": jnp.asarray(ref.bias.detach().numpy())}
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    flax_shapes = jax.eval_shape(nn.Conv(6, (kernel, kernel), feature_group_count=groups).init,
                                 jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, conv.init(jax.random.PRNGKey(0), x)) == \
        jax.tree.map(lambda s: s.shape, flax_shapes)
    np.testing.assert_allclose(conv.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)


def _torch_and_flax_batch_norm(torch_class, num_features):
    torch_bn = torch_class(num_features, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 1.5)
        torch_bn.bias.normal_()
    params = {"scale": jnp.asarray(torch_bn.weight.detach().numpy()),
              "bias": jnp.asarray(torch_bn.bias.detach().numpy())}
    return torch_bn, params


# (shape of the jax input, torch layout of it, feature axis): BatchNorm2d on NHWC maps,
# BatchNorm1d on [B, D] (RSD's AAD projector) and on [B, L, D] tokens with L the feature axis
# (PAT's token aligner).
BATCH_NORM_CASES = {
    "2d": (torch.nn.BatchNorm2d, (4, 5, 5, 3), (0, 3, 1, 2), -1),
    "1d": (torch.nn.BatchNorm1d, (6, 7), (0, 1), -1),
    "1d_tokens": (torch.nn.BatchNorm1d, (3, 4, 5), (0, 1, 2), 1)}


@pytest.mark.parametrize("case", list(BATCH_NORM_CASES))
def test_batch_norm_updates_like_torch_over_steps_then_evaluates(case):
    torch_class, shape, to_torch, axis = BATCH_NORM_CASES[case]
    torch.manual_seed(0)
    torch_bn, params = _torch_and_flax_batch_norm(torch_class, shape[axis])
    bn_train, bn_eval = layers.batch_norm(True, axis=axis), layers.batch_norm(False, axis=axis)
    stats = bn_train.init(jax.random.PRNGKey(0), jnp.zeros(shape))["batch_stats"]
    rng = np.random.default_rng(0)
    torch_bn.train()
    for step in range(4):
        x = (rng.normal(size=shape) * (1 + step) + step).astype(np.float32)
        with torch.no_grad():
            expected = torch_bn(torch.from_numpy(x).permute(*to_torch).contiguous())
        y, updates = bn_train.apply({"params": params, "batch_stats": stats}, jnp.asarray(x),
                                    mutable=["batch_stats"])
        stats = updates["batch_stats"]
        np.testing.assert_allclose(np.asarray(y).transpose(*to_torch), expected.numpy(),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["mean"], torch_bn.running_mean.numpy(), rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(stats["var"], torch_bn.running_var.numpy(), rtol=1e-6)
    torch_bn.eval()
    x = rng.normal(size=shape).astype(np.float32)
    with torch.no_grad():
        expected = torch_bn(torch.from_numpy(x).permute(*to_torch).contiguous())
    y = bn_eval.apply({"params": params, "batch_stats": stats}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y).transpose(*to_torch), expected.numpy(), rtol=1e-5,
                               atol=1e-5)


def test_batch_norm_refuses_one_value_per_feature_in_training():
    bn = layers.batch_norm(True)
    variables = bn.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))  # init updates nothing
    with pytest.raises(ValueError, match="more than one value per feature"):
        bn.apply(variables, jnp.ones((1, 4)), mutable=["batch_stats"])


def test_batch_norm_statistics_are_over_the_global_batch_when_sharded():
    mesh = sharding.data_mesh()
    assert mesh.size == 8
    bn = layers.batch_norm(True)
    x = _normal(0, (16, 3, 3, 4)) * 2 + 1
    variables = bn.init(jax.random.PRNGKey(0), x)
    step = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
    y, updates = step(variables, x)
    y_sharded, updates_sharded = step(jax.device_put(variables, sharding.replicated(mesh)),
                                      jax.device_put(x, sharding.batch_sharding(mesh)))
    assert len(y_sharded.sharding.device_set) == 8
    np.testing.assert_allclose(y_sharded, y, rtol=1e-6, atol=1e-6)
    for name in ("mean", "var"):
        np.testing.assert_allclose(updates_sharded["batch_stats"][name],
                                   updates["batch_stats"][name], rtol=1e-6)
    # n / (n - 1) with n = 16 * 3 * 3 values per channel, all devices together.
    var = np.var(np.asarray(x).reshape(-1, 4), axis=0) * 144 / 143
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)


class _DropPath(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, x, train):
        return layers.drop_path(self, x, self.rate, train)


def test_drop_path_drops_whole_samples_and_rescales_the_kept():
    x = jnp.ones((64, 3, 2))
    rngs = {"dropout": jax.random.PRNGKey(0)}
    np.testing.assert_array_equal(_DropPath(0.25).apply({}, x, False), x)
    y = np.asarray(_DropPath(0.25).apply({}, x, True, rngs=rngs))
    per_sample = y.reshape(64, -1)
    assert set(np.unique(per_sample)) == {np.float32(0), np.float32(1) / np.float32(0.75)}
    assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))  # whole samples
    assert 0 < np.sum(per_sample[:, 0] == 0) < 64
    np.testing.assert_array_equal(_DropPath(1.0).apply({}, x, True, rngs=rngs), 0 * x)


@pytest.mark.parametrize("shape,eps", [((4, 7, 12), 1e-6), ((2, 3, 5, 16), 1e-5)])
def test_layer_norm_matches_torch_forward_and_backward(shape, eps):
    """Values, input gradient and parameter gradients of torch.nn.LayerNorm: the closed-form
    backward against PyTorch's autograd, on inputs off zero mean and unit scale."""
    x = np.asarray(_normal(0, shape)) * 3.0 + 1.5
    scale, bias = (np.asarray(_normal(seed, shape[-1:])) for seed in (1, 2))
    cotangent = np.asarray(_normal(3, shape))
    module = layers.layer_norm(eps, None)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    out, (grad_params, grad_x) = jax.jit(jax.value_and_grad(
        lambda p, x: jnp.sum(module.apply(p, x) * cotangent), argnums=(0, 1)))(params, x)
    reference = torch.nn.LayerNorm(shape[-1], eps=eps)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(scale))
        reference.bias.copy_(torch.from_numpy(bias))
    x_torch = torch.from_numpy(x).requires_grad_()
    torch_out = (reference(x_torch) * torch.from_numpy(cotangent)).sum()
    torch_out.backward()
    np.testing.assert_allclose(out, torch_out.item(), rtol=1e-5)
    np.testing.assert_allclose(grad_x, x_torch.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_params["params"]["scale"], reference.weight.grad.numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_params["params"]["bias"], reference.bias.grad.numpy(),
                               rtol=1e-5, atol=1e-5)


def test_layer_norm_computes_in_float32_and_returns_its_dtype():
    x = (_normal(0, (2, 5, 8)) * 4.0 + 2.0).astype(jnp.bfloat16)
    for dtype, expected in ((jnp.bfloat16, jnp.bfloat16), (None, jnp.float32)):
        module = layers.layer_norm(1e-6, dtype)
        params = module.init(jax.random.PRNGKey(0), x)
        assert params["params"]["scale"].dtype == jnp.float32
        out = module.apply(params, x)
        assert out.dtype == expected
        x32 = x.astype(jnp.float32)
        normed = (x32 - x32.mean(-1, keepdims=True)) / jnp.sqrt(x32.var(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(out.astype(jnp.float32), normed, rtol=1e-2, atol=1e-2)
        grad = jax.grad(lambda x: jnp.sum(module.apply(params, x).astype(jnp.float32) ** 2))(x)
        assert grad.dtype == jnp.bfloat16  # the cotangent keeps the input's dtype


@pytest.mark.parametrize("shape,kernel,stride,pad", [((2, 9, 11, 4), 3, 2, 1),
                                                     ((2, 8, 8, 3), 2, 2, 0),
                                                     ((1, 7, 7, 2), 3, 1, 1)])
def test_max_pool_routes_gradients_to_the_first_maximum_as_torch(shape, kernel, stride, pad):
    """Both backwards against torch.nn.functional.max_pool2d's, on inputs with ties (a ReLU's
    zeros and repeated values), where the first maximum in row-major order takes the gradient."""
    x = np.maximum(np.round(np.asarray(_normal(0, shape)) * 2.0) / 2.0, 0.0).copy()
    cotangent = np.array(_normal(1, (shape[0],) + tuple(
        (n + 2 * pad - kernel) // stride + 1 for n in shape[1:3]) + shape[3:]))
    x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    out_torch = torch.nn.functional.max_pool2d(x_torch, kernel, stride, pad)
    (out_torch * torch.from_numpy(cotangent).permute(0, 3, 1, 2)).sum().backward()
    expected = x_torch.grad.permute(0, 2, 3, 1).numpy()
    assert np.any(expected != 0)
    for backward in layers.MAX_POOL_BACKWARDS:
        pool = lambda x, b=backward: layers.max_pool2d(x, kernel, stride, pad, b)  # noqa: E731
        out, vjp = jax.vjp(jax.jit(pool), jnp.asarray(x))
        np.testing.assert_array_equal(out, out_torch.detach().permute(0, 2, 3, 1).numpy())
        # (an input in overlapping windows sums their gradients in another order)
        np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], expected, rtol=1e-6,
                                   atol=1e-6, err_msg=backward)


def test_cpu_max_pool_backward_has_no_select_and_scatter():
    x = _normal(0, (2, 8, 8, 3))
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(layers.max_pool2d(x, 3, 2, 1) ** 2))).lower(
        x).as_text()
    assert "select_and_scatter" not in hlo and "reduce_window" in hlo


def test_max_pool_backwards_agree_inside_a_training_step(monkeypatch):
    """Inside ResNet's jitted training gradient XLA may recompute the pool's input (conv, BN,
    ReLU) with other rounding than the forward's: the routing must still find each window's
    maximum (comparing with the forward's output did not, and lost the stem's gradient)."""
    from jaxkd import models

    model = models.create_model("resnet18", num_classes=10, layers=[1, 1, 1, 1])
    images = jax.random.uniform(jax.random.PRNGKey(0), (8, 224, 224, 3))
    variables = model.init(jax.random.PRNGKey(1), images, train=False)

    def stem_grads():
        def loss(params):
            (logits, _), _ = model.apply({**variables, "params": params}, images, train=True,
                                         mutable=["batch_stats"])
            return jnp.sum(jax.nn.log_softmax(logits)[:, 0])
        grads = jax.jit(jax.grad(loss))(variables["params"])
        return grads["conv1"]["kernel"], grads["bn1"]["scale"]

    per_backward = {}
    for backward in layers.MAX_POOL_BACKWARDS:
        monkeypatch.setitem(layers.MAX_POOL_BACKWARD, jax.default_backend(), backward)
        per_backward[backward] = stem_grads()
    for taps, xla in zip(per_backward["taps"], per_backward["xla"]):
        np.testing.assert_allclose(taps, xla, rtol=1e-5, atol=1e-6)
