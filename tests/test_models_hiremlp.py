"""HireMLP-S (OFA-KD's custom_model/hire_mlp.py) against a PyTorch twin written here from the
architecture, with the original's module names (so its state dict has the original's keys):
parity of logits, embedding and the four stage maps in eval and training mode, every pad mode,
parameter count and stage shapes of the original size, and conversion both ways."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jaxkd.convert import (ConversionError, apply_converted, flax_to_timm, read_state_dict,
                           timm_to_flax)
from jaxkd.convert.core import abstract_variables, converter_for
from jaxkd.errors import ConfigError
from jaxkd.models import create_model, model_info

from timm_parity import (assert_close, assert_keys_listed, assert_pre_stage_hook_placement,
                         flat, max_diff, parameter_count, randomise_parameters_and_statistics,
                         scaled_tolerance)

NAME = "hire_mlp_small"
NUM_CLASSES = 10
# Measured on the twin of the original size at 1000 classes (the paper: 33M).
HIRE_MLP_SMALL_PARAMETERS = 33_113_848
# OFA-KD's stage_info for hire_mlp_small, (C, H, W) as NHWC.
STAGE_SHAPES_224 = [(56, 56, 64), (28, 28, 128), (14, 14, 320), (7, 7, 512)]
# The original's pixel, step_stride and step_dilation with fewer, narrower blocks; at 40 x 52
# px the stage maps are 10x13, 5x7, 3x4, 2x2, so regions of 4 and 3 pad both axes (each by a
# different amount), and block 1 of stage 2 shifts by 2, blocks 1 and 2 of stage 3 by 1 and 2.
REDUCED = dict(layers=(1, 2, 3, 1), embed_dims=(8, 16, 24, 32))
HEIGHT, WIDTH = 40, 52


# ----------------------------------------------------------------------------- PyTorch twin

class TwinMlp(nn.Module):
    def __init__(self, cin, hidden, cout):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(cin, hidden, 1), nn.Conv2d(hidden, cout, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TwinHireMLP(nn.Module):
    """NCHW, as the original: rows (columns) shifted by `step`, padded to a multiple of
    `pixel`, each run of `pixel` of them reshaped onto the channels, mixed, and put back."""

    _PAD = {"c": "circular", "0": "constant", "replicate": "replicate"}

    def __init__(self, dim, pixel, step, step_pad_mode, pixel_pad_mode):
        super().__init__()
        self.pixel, self.step = pixel, step
        self.step_pad_mode, self.pixel_pad_mode = step_pad_mode, pixel_pad_mode
        for branch in "hw":
            setattr(self, f"mlp_{branch}1", nn.Conv2d(dim * pixel, dim // 2, 1, bias=False))
            setattr(self, f"mlp_{branch}1_norm", nn.BatchNorm2d(dim // 2))
            setattr(self, f"mlp_{branch}2", nn.Conv2d(dim // 2, dim * pixel, 1))
        self.mlp_c = nn.Conv2d(dim, dim, 1)
        self.reweight = TwinMlp(dim, dim // 4, dim * 3)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        p, s = self.pixel, self.step
        h, w = x, x
        if s and self.step_pad_mode == "c":
            h, w = h.roll(s, 2), w.roll(s, 3)
        elif s:
            h, w = F.pad(h, (0, 0, s, 0))[:, :, :H], F.pad(w, (s, 0, 0, 0))[:, :, :, :W]
        pad_h, pad_w = (p - H % p) % p, (p - W % p) % p
        mode = self._PAD[self.pixel_pad_mode]
        h, w = F.pad(h, (0, 0, 0, pad_h), mode=mode), F.pad(w, (0, pad_w, 0, 0), mode=mode)
        Hp, Wp = H + pad_h, W + pad_w
        h = h.reshape(B, C, Hp // p, p, W).permute(0, 1, 3, 2, 4).reshape(B, C * p, Hp // p, W)
        w = w.reshape(B, C, H, Wp // p, p).permute(0, 1, 4, 2, 3).reshape(B, C * p, H, Wp // p)
        h = self.mlp_h2(F.relu(self.mlp_h1_norm(self.mlp_h1(h))))
        w = self.mlp_w2(F.relu(self.mlp_w1_norm(self.mlp_w1(w))))
        h = h.reshape(B, C, p, Hp // p, W).permute(0, 1, 3, 2, 4).reshape(B, C, Hp, W)[:, :, :H]
        w = w.reshape(B, C, p, H, Wp // p).permute(0, 1, 3, 4, 2).reshape(B, C, H, Wp)
        w = w[:, :, :, :W]
        if s and self.step_pad_mode == "c":
            h, w = h.roll(-s, 2), w.roll(-s, 3)
        c = self.mlp_c(x)
        a = self.reweight((h + w + c).mean((2, 3), keepdim=True)).reshape(B, C, 3)
        a = a.permute(2, 0, 1).softmax(dim=0)[..., None, None]
        return self.proj(h * a[0] + w * a[1] + c * a[2])


class TwinBlock(nn.Module):
    def __init__(self, dim, mlp_ratio, pixel, step, step_pad_mode, pixel_pad_mode):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = TwinHireMLP(dim, pixel, step, step_pad_mode, pixel_pad_mode)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = TwinMlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TwinConvBnRelu(nn.Module):
    def __init__(self, cin, cout, kernel, stride, padding):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride, padding)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.norm(self.proj(x)))


class TwinHireMLPNet(nn.Module):
    """Returns (logits, embedding, NCHW outputs of network entries 0, 2, 4, 6)."""

    def __init__(self, layers=(3, 4, 10, 3), embed_dims=(64, 128, 320, 512), num_classes=1000,
                 mlp_ratios=(4, 4, 4, 4), pixel=(4, 3, 3, 2), step_stride=(2, 2, 3, 2),
                 step_dilation=(2, 2, 1, 1), step_pad_mode="c", pixel_pad_mode="c"):
        super().__init__()
        self.patch_embed = TwinConvBnRelu(3, embed_dims[0], 7, 4, 2)
        network = []
        for i, depth in enumerate(layers):
            if i:
                network.append(TwinConvBnRelu(embed_dims[i - 1], embed_dims[i], 3, 2, 1))
            network.append(nn.Sequential(*[
                TwinBlock(embed_dims[i], mlp_ratios[i], pixel[i],
                          (j % step_stride[i]) * step_dilation[i], step_pad_mode, pixel_pad_mode)
                for j in range(depth)]))
        self.network = nn.ModuleList(network)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        stages = []
        for index, entry in enumerate(self.network):
            x = entry(x)
            if index % 2 == 0:
                stages.append(x)
        embedding = self.norm(x).mean((2, 3))
        return self.head(embedding), embedding, stages


def randomised_twin(seed=0, **kw):
    torch.manual_seed(seed)
    return randomise_parameters_and_statistics(
        TwinHireMLPNet(num_classes=NUM_CLASSES, **{**REDUCED, **kw}), HEIGHT)


def images(batch=2, seed=1):
    """The same random batch as NCHW torch and NHWC numpy."""
    nchw = torch.randn(batch, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))
    return nchw, nchw.permute(0, 2, 3, 1).numpy()


def twin_outputs(twin, nchw):
    with torch.no_grad():
        logits, embedding, stages = twin(nchw)
    return logits.numpy(), embedding.numpy(), [s.permute(0, 2, 3, 1).numpy() for s in stages]


def assert_matches(logits, features, expected):
    """Logits within 1e-4; the embedding and the (un-normalised) stage maps within 1e-4 of
    their scale, on a reference the random weights keep far from zero."""
    expected_logits, embedding, stages = expected
    assert np.abs(expected_logits).max() > 0.1, "degenerate reference: logits carry no signal"
    assert_close(logits, expected_logits, "logits")
    assert_close(features["embedding"], embedding, "embedding", scaled_tolerance(embedding))
    assert len(features["stages"]) == 4
    for i, (ours, theirs) in enumerate(zip(features["stages"], stages)):
        assert_close(ours, theirs, f"stage {i + 1}", scaled_tolerance(theirs))


@pytest.fixture(scope="module")
def reduced():
    """The reduced twin (the default 'c' pad modes) and its converted, jitted Flax model."""
    twin = randomised_twin()
    nchw, nhwc = images()
    variables = timm_to_flax(NAME, twin.state_dict(), **REDUCED)  # 10 classes, from the head
    model = create_model(NAME, num_classes=NUM_CLASSES, **REDUCED)
    logits, features = jax.jit(model.apply)(variables, nhwc)
    return dict(name=NAME, torch_model=twin, model=model, variables=variables, images=nhwc,
                logits=logits, features=features, expected=twin_outputs(twin, nchw))


# ---------------------------------------------------------------------------------- parity

def test_parity_eval_mode(reduced):
    assert_matches(reduced["logits"], reduced["features"], reduced["expected"])


@pytest.mark.parametrize("step_pad_mode,pixel_pad_mode", [("0", "replicate"), ("c", "0")])
def test_parity_other_pad_modes(step_pad_mode, pixel_pad_mode):
    kw = dict(REDUCED, step_pad_mode=step_pad_mode, pixel_pad_mode=pixel_pad_mode)
    twin = randomised_twin(seed=1, **kw)
    nchw, nhwc = images()
    variables = timm_to_flax(NAME, twin.state_dict(), **kw)
    logits, features = jax.jit(create_model(NAME, num_classes=NUM_CLASSES, **kw).apply)(
        variables, nhwc)
    assert_matches(logits, features, twin_outputs(twin, nchw))


def test_parity_train_mode_and_running_statistics(reduced):
    """Batch statistics in training, and every BN's updated running mean and (unbiased)
    variance equal to the twin's after the same training-mode forward."""
    twin = copy.deepcopy(reduced["torch_model"]).train()
    nchw, nhwc = images(batch=2, seed=2)
    expected = twin_outputs(twin, nchw)
    train = jax.jit(lambda v, x: reduced["model"].apply(v, x, train=True,
                                                        mutable=["batch_stats"]))
    (logits, features), updates = train(reduced["variables"], nhwc)
    assert_matches(logits, features, expected)
    updated = flat(timm_to_flax(NAME, twin.state_dict(), **REDUCED)["batch_stats"])
    ours = flat(updates["batch_stats"])
    assert ours.keys() == updated.keys()
    before = flat(reduced["variables"]["batch_stats"])
    for path, value in updated.items():
        assert not np.allclose(value, before[path]), "/".join(path)
        np.testing.assert_allclose(ours[path], value, rtol=1e-5, atol=1e-6,
                                   err_msg="/".join(path))


def test_parity_at_224_px_with_the_original_widths():
    """The original's widths and map sizes (fewer blocks, to compile fast): regions of 3 pad
    the 28x28 and 14x14 maps by 2 and 1, and block 1 of stages 2 and 3 shifts by 2 and 1."""
    kw = dict(layers=(1, 2, 2, 1))
    torch.manual_seed(0)
    twin = randomise_parameters_and_statistics(TwinHireMLPNet(**kw), 224)
    nchw = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    variables = timm_to_flax(NAME, twin.state_dict(), **kw)
    logits, features = jax.jit(create_model(NAME, **kw).apply)(
        variables, nchw.permute(0, 2, 3, 1).numpy())
    assert [s.shape[1:] for s in features["stages"]] == STAGE_SHAPES_224
    assert_matches(logits, features, twin_outputs(twin, nchw))

# ------------------------------------------------------------------- the original's size

def test_registry_entry_and_parameter_count():
    info = model_info(NAME)
    assert (info.family, info.token_stages, info.input_size) == ("mlp", False, 224)
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    assert converter_for(NAME).name == "hiremlp"
    twin = TwinHireMLPNet()
    assert sum(p.numel() for p in twin.parameters()) == HIRE_MLP_SMALL_PARAMETERS
    shapes = abstract_variables(NAME, 1000)
    assert parameter_count(shapes["params"]) == HIRE_MLP_SMALL_PARAMETERS
    buffers = sum(b.numel() for k, b in twin.state_dict().items()
                  if k.endswith(("running_mean", "running_var")))
    assert parameter_count(shapes["batch_stats"]) == buffers


def test_stage_and_embedding_shapes_at_224():
    model = create_model(NAME)
    logits, features = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.PRNGKey(0), x)[0],
        jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert [s.shape[1:] for s in features["stages"]] == STAGE_SHAPES_224
    assert features["embedding"].shape == (2, 512) and logits.shape == (2, 1000)


# ------------------------------------------------------------------------------ conversion

def test_round_trip_and_a_saved_file(tmp_path, reduced):
    """Flax -> the original's state dict (strict load into the twin, every tensor equal) ->
    Flax, exactly; a `.pth` the original's training saves reads with weights_only."""
    twin, variables = reduced["torch_model"], reduced["variables"]
    exported = flax_to_timm(NAME, variables)
    fresh = TwinHireMLPNet(num_classes=NUM_CLASSES, **REDUCED)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for key, value in twin.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(),
                                          err_msg=key)
    back = flat(timm_to_flax(NAME, exported, **REDUCED))
    assert back.keys() == flat(variables).keys()
    for path, value in flat(variables).items():
        np.testing.assert_array_equal(back[path], value, err_msg="/".join(path))

    path = tmp_path / "hire_mlp_small.pth"
    torch.save(twin.state_dict(), path)
    from_file = flat(timm_to_flax(NAME, read_state_dict(str(path)), **REDUCED))
    for path, value in flat(variables).items():
        np.testing.assert_array_equal(from_file[path], value, err_msg="/".join(path))


def test_missing_and_unknown_keys_are_listed(reduced):
    assert_keys_listed(reduced, REDUCED, "network.4.1.attn.mlp_w1_norm.running_var",
                       "network.4.1.attn.extra",
                       "batch_stats/network_4_1/attn/mlp_w1_norm/var <- "
                       "network.4.1.attn.mlp_w1_norm.running_var")
    state_dict = dict(reduced["torch_model"].state_dict())
    del state_dict["network.3.proj.weight"]
    with pytest.raises(ConversionError, match="params/network_3/proj/kernel"):
        timm_to_flax(NAME, state_dict, **REDUCED)


def test_headless_backbone(reduced):
    """Without `head.*` (num_classes 0): no classifier, the same embedding."""
    state_dict = {k: v for k, v in reduced["torch_model"].state_dict().items()
                  if not k.startswith("head.")}
    variables = timm_to_flax(NAME, state_dict, num_classes=0, **REDUCED)
    assert "head" not in variables["params"]
    logits, features = apply_converted(NAME, variables, reduced["images"], **REDUCED)
    assert logits is None
    assert_close(features["embedding"], np.asarray(reduced["features"]["embedding"]),
                 "embedding")


# ------------------------------------------------------------------------ module behaviour

def test_pre_stage_hook_placement(reduced):
    """Stage k's hook sees the input of its first block, after the downsampling (stage 1:
    the stem's 10x13 map)."""
    assert_pre_stage_hook_placement(reduced, (2, 10, 13, 8), after_downsampling=True)


def test_drop_path_only_in_training(reduced):
    model = create_model(NAME, num_classes=NUM_CLASSES, drop_path_rate=0.5, **REDUCED)
    variables, nhwc = reduced["variables"], reduced["images"]
    np.testing.assert_array_equal(jax.jit(model.apply)(variables, nhwc)[0], reduced["logits"])
    train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                  rngs={"dropout": key})[0][0])
    first = train(variables, nhwc, jax.random.PRNGKey(1))
    assert max_diff(first, train(variables, nhwc, jax.random.PRNGKey(2))) > 1e-3
    np.testing.assert_array_equal(first, train(variables, nhwc, jax.random.PRNGKey(1)))


def test_bfloat16_compute_keeps_float32_params(reduced):
    model = create_model(NAME, num_classes=NUM_CLASSES, dtype=jnp.bfloat16, **REDUCED)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), reduced["images"])))
    logits, features = jax.jit(model.apply)(reduced["variables"], reduced["images"])
    assert logits.dtype == jnp.bfloat16 and features["stages"][3].dtype == jnp.bfloat16
    expected = np.asarray(reduced["logits"])
    assert max_diff(logits, expected) < 0.05 * float(np.abs(expected).max())


def test_bad_overrides_are_config_errors():
    with pytest.raises(ConfigError, match="step_pad_mode must be one of"):
        create_model(NAME, step_pad_mode="replicate")
    with pytest.raises(ConfigError, match="pixel_pad_mode must be one of"):
        create_model(NAME, pixel_pad_mode="reflect")
    with pytest.raises(ConfigError, match="one entry per stage"):
        create_model(NAME, layers=(2, 2, 2))
    with pytest.raises(ConfigError, match="bad overrides"):
        create_model(NAME, depths=(2, 2, 2, 2))  # the original calls them layers
