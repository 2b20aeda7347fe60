"""CycleMLP-B3 against a PyTorch twin written here from the architecture of the official OFA-KD
code (custom_model/cycle_mlp.py, custom_forward/cycle_mlp.py), with its state-dict keys and its
persistent CycleFC `offset` buffers: parity of logits, embedding and the four stages, parameter
count and stage shapes of the original size, and conversion both ways.

The original's CycleFC calls torchvision's deform_conv2d. torchvision's compiled ops do not load
against this torch build, so the twin's CycleFC samples by integer shifts, and
`test_twin_cycle_fc_samples_as_deform_conv2d` checks it against a loop that computes
deform_conv2d's bilinear sampling directly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jaxkd.convert import (ConversionError, apply_converted, converter_for, flax_to_timm,
                           read_state_dict, timm_to_flax)
from jaxkd.convert.cyclemlp import offset_buffers, original_key
from jaxkd.errors import ConfigError
from jaxkd.models import create_model, model_info

from timm_parity import (absolute_tolerance, assert_bfloat16_compute_keeps_float32_params,
                         assert_close, assert_drop_path_only_in_training,
                         assert_pre_stage_hook_placement, flat, parameter_count,
                         randomise_parameters_and_statistics, random_images, scaled_tolerance)

NAME = "cyclemlp_b3"
NUM_CLASSES = 10
B3 = dict(layers=(3, 4, 18, 3), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4))
# Parameters of CycleMLP-B3 at 1000 classes, measured on the twin (the paper: 38M).
B3_PARAMETERS = 38_385_720
# The official stage_info of CycleMLP_B3: network index and (C, H, W) of stages 1-4 at 224 px.
B3_STAGE_INFO = ((0, (64, 56, 56)), (2, (128, 28, 28)), (4, (320, 14, 14)), (6, (512, 7, 7)))
# Reduced: odd map sizes (12, 6, 3, 2) and widths both divisible and not by the extent 3.
SMALL = dict(img_size=48, layers=(1, 2, 1, 1), embed_dims=(8, 16, 24, 32),
             mlp_ratios=(2, 2, 1, 1))


# ------------------------------------------------------------------------------------- the twin

class TwinCycleFC(nn.Module):
    """A 1x1 conv over channels, each input channel read displaced by its fixed offset.

    The offsets are the original's `offset` buffer [1, 2C, 1, 1], (dy, dx) per channel: for a
    1 x k (k x 1) extent, channel c moves along W (H) by (c + k // 2) % k - k // 2.
    """

    def __init__(self, cin, cout, extent):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(cout))
        nn.init.trunc_normal_(self.weight, std=0.02)
        kh, kw = extent
        area, axis = kh * kw, 0 if kh > 1 else 1
        offset = torch.zeros(1, 2 * cin, 1, 1)
        for c in range(cin):
            offset[0, 2 * c + axis] = (c + area // 2) % area - area // 2
        self.register_buffer("offset", offset)

    def forward(self, x):
        _, channels, height, width = x.shape
        dy, dx = self.offset[0, 0::2, 0, 0].long(), self.offset[0, 1::2, 0, 0].long()
        rows = torch.arange(height)[None, :, None] + dy[:, None, None]  # [C, H, 1]
        cols = torch.arange(width)[None, None, :] + dx[:, None, None]  # [C, 1, W]
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        sampled = x[:, torch.arange(channels)[:, None, None], rows.clamp(0, height - 1),
                    cols.clamp(0, width - 1)]
        return F.conv2d(sampled * inside, self.weight, self.bias)


class TwinMlp(nn.Module):
    def __init__(self, dim, hidden, out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TwinCycleMLP(nn.Module):
    """CycleFC along W and along H plus a channel Linear, mixed by per-channel softmax weights
    over the three (the reweight MLP's outputs 3c, 3c + 1, 3c + 2 for channel c)."""

    def __init__(self, dim):
        super().__init__()
        self.mlp_c = nn.Linear(dim, dim, bias=False)
        self.sfc_h = TwinCycleFC(dim, dim, (1, 3))
        self.sfc_w = TwinCycleFC(dim, dim, (3, 1))
        self.reweight = TwinMlp(dim, dim // 4, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # [B, H, W, C]
        batch, _, _, dim = x.shape
        nchw = x.permute(0, 3, 1, 2)
        h = self.sfc_h(nchw).permute(0, 2, 3, 1)
        w = self.sfc_w(nchw).permute(0, 2, 3, 1)
        c = self.mlp_c(x)
        weights = self.reweight((h + w + c).mean(dim=(1, 2))).reshape(batch, dim, 3)
        weights = weights.softmax(dim=-1)[:, None, None]
        return self.proj(h * weights[..., 0] + w * weights[..., 1] + c * weights[..., 2])


class TwinBlock(nn.Module):
    def __init__(self, dim, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), TwinCycleMLP(dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), TwinMlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TwinConv(nn.Module):
    """The original's PatchEmbedOverlapping and Downsample: one conv `proj`, NHWC out."""

    def __init__(self, cin, cout, kernel, stride, padding):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride, padding)

    def forward(self, x):  # NHWC in, except for the image
        return self.proj(x).permute(0, 2, 3, 1)


class TwinCycleNet(nn.Module):
    """Stem, then `network` = [blocks, downsample, blocks, ...], final LayerNorm, token mean,
    head. forward returns (logits, [output of each network entry (NHWC)..., embedding]), as the
    official custom forward's `requires_feat` output."""

    def __init__(self, layers, embed_dims, mlp_ratios, num_classes):
        super().__init__()
        self.patch_embed = TwinConv(3, embed_dims[0], 7, 4, 2)
        network = []
        for s, (depth, dim, ratio) in enumerate(zip(layers, embed_dims, mlp_ratios)):
            if s > 0:
                network.append(TwinConv(embed_dims[s - 1], dim, 3, 2, 1))
            network.append(nn.Sequential(*[TwinBlock(dim, ratio) for _ in range(depth)]))
        self.network = nn.ModuleList(network)
        self.norm = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, images):
        x = self.patch_embed(images)
        feats = []
        for entry in self.network:
            x = entry(x.permute(0, 3, 1, 2) if isinstance(entry, TwinConv) else x)
            feats.append(x)
        embedding = self.norm(x).mean(dim=(1, 2))
        return self.head(embedding), feats + [embedding]


def twin(config, num_classes=NUM_CLASSES):
    return TwinCycleNet(config["layers"], config["embed_dims"], config["mlp_ratios"],
                        num_classes)


def deform_conv2d_by_loops(x, offset, weight, bias):
    """torchvision's deform_conv2d (stride 1, no padding, dilation 1, no mask) computed by its
    definition: input channel c (in offset group c // (C / groups)) is sampled for kernel tap
    (i, j) at output (y, x) at (y + i + dy, x + j + dx), with bilinear interpolation that
    reads 0 outside the map and returns 0 at or beyond one pixel outside it."""
    batch, channels, height, width = x.shape
    _, _, kh, kw = weight.shape
    groups = offset.shape[1] // (2 * kh * kw)
    out_h, out_w = height - kh + 1, width - kw + 1

    def pixel(image, row, col):
        inside = 0 <= row < height and 0 <= col < width
        return image[row, col] if inside else 0.0

    def bilinear(image, h, w):
        if h <= -1 or h >= height or w <= -1 or w >= width:
            return 0.0
        h0, w0 = math.floor(h), math.floor(w)
        lh, lw = h - h0, w - w0
        return ((1 - lh) * (1 - lw) * pixel(image, h0, w0)
                + (1 - lh) * lw * pixel(image, h0, w0 + 1)
                + lh * (1 - lw) * pixel(image, h0 + 1, w0)
                + lh * lw * pixel(image, h0 + 1, w0 + 1))

    columns = np.zeros((batch, channels, kh, kw, out_h, out_w))
    for b, c, i, j, y, xx in np.ndindex(*columns.shape):
        base = 2 * ((c // (channels // groups)) * kh * kw + i * kw + j)
        dy, dx = offset[b, base, y, xx], offset[b, base + 1, y, xx]
        columns[b, c, i, j, y, xx] = bilinear(x[b, c], y + i + dy, xx + j + dx)
    return np.einsum("ocij,bcijyx->boyx", weight, columns) + bias[None, :, None, None]


# ----------------------------------------------------------------------------------- fixtures

def run_both(torch_model, state_dict, overrides, size, batch=2):
    """The twin and the Flax model converted from `state_dict`, run (jitted) on the same
    images; the twin's stages are the network entries the official stage_info selects."""
    images_nchw, images = random_images(size, batch)
    with torch.no_grad():
        logits, feats = torch_model(images_nchw)
    variables = timm_to_flax(NAME, state_dict, **overrides)
    model = create_model(NAME, num_classes=logits.shape[1], **overrides)
    ours_logits, features = jax.jit(model.apply)(variables, images)
    stages = [feats[index].numpy() for index, _ in B3_STAGE_INFO]
    return dict(name=NAME, torch_model=torch_model, model=model, variables=variables,
                images=images, logits=ours_logits, features=features,
                expected=(logits.numpy(), feats[-1].numpy(), stages))


def assert_parity(run):
    """Logits within 1e-4; the embedding (after LayerNorm) within 1e-4, the un-normalised stage
    maps within 1e-4 of their scale."""
    logits, embedding, stages = run["expected"]
    assert np.abs(logits).max() > 0.1, "degenerate reference: logits carry no signal"
    assert_close(run["logits"], logits, "logits")
    assert_close(run["features"]["embedding"], embedding, "embedding",
                 absolute_tolerance(embedding))
    assert len(run["features"]["stages"]) == 4
    for i, (ours, theirs) in enumerate(zip(run["features"]["stages"], stages)):
        assert_close(ours, theirs, f"stage {i + 1}", scaled_tolerance(theirs))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A randomised reduced twin, saved with torch.save and read back through jaxkd's reader
    (weights-only loading), converted and run on the twin's images."""
    torch.manual_seed(0)
    torch_model = randomise_parameters_and_statistics(twin(SMALL), SMALL["img_size"])
    path = tmp_path_factory.mktemp("cyclemlp") / "cyclemlp_small.pth"
    torch.save(torch_model.state_dict(), path)
    return run_both(torch_model, read_state_dict(str(path)), SMALL, SMALL["img_size"])


# ----------------------------------------------------------------------------------- the tests

def test_twin_cycle_fc_samples_as_deform_conv2d():
    """The twin's CycleFC equals deform_conv2d's sampling with its offset buffer, for both
    extents and a width not divisible by 3; the loop itself equals a plain conv at offset 0."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 4, 5, generator=generator)
    for extent in ((1, 3), (3, 1)):
        fc = TwinCycleFC(7, 6, extent)
        with torch.no_grad():
            fc.weight.normal_(generator=generator)
            fc.bias.normal_(generator=generator)
            ours = fc(x).numpy()
        offset = fc.offset.expand(2, -1, 4, 5).numpy()
        assert set(np.unique(offset)) == {-1.0, 0.0, 1.0}
        expected = deform_conv2d_by_loops(x.numpy(), offset, fc.weight.detach().numpy(),
                                          fc.bias.detach().numpy())
        np.testing.assert_allclose(ours, expected, atol=1e-5, err_msg=str(extent))
    weight, bias = torch.randn(3, 7, 3, 3, generator=generator), torch.randn(3)
    expected = F.conv2d(x, weight, bias).numpy()
    zero_offsets = np.zeros((2, 2 * 9, 2, 3))
    np.testing.assert_allclose(deform_conv2d_by_loops(x.numpy(), zero_offsets, weight.numpy(),
                                                      bias.numpy()), expected, atol=1e-5)


def test_registry_parameter_count_stage_shapes_and_keys_of_b3():
    """The original size: parameters as the twin's (and the paper's 38M), the official
    stage_info shapes at 224 px, and the twin's state-dict keys and offsets exactly."""
    info = model_info(NAME)
    assert (info.family, info.token_stages, info.input_size) == ("mlp", False, 224)
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    converter = converter_for(NAME)
    assert converter.name == "cyclemlp" and not converter.timm_twin

    torch_model = twin(B3, num_classes=1000)
    assert sum(p.numel() for p in torch_model.parameters()) == B3_PARAMETERS
    assert round(B3_PARAMETERS / 1e6) == 38
    model = create_model(NAME)
    (logits, features), variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.PRNGKey(0), x),
        jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert set(variables) == {"params"}
    assert parameter_count(variables) == B3_PARAMETERS
    assert logits.shape == (2, 1000) and features["embedding"].shape == (2, 512)
    assert [s.shape for s in features["stages"]] == [(2, h, w, c)
                                                     for _, (c, h, w) in B3_STAGE_INFO]
    shapes = flat(variables)
    buffers = offset_buffers(shapes)
    expected_sd = torch_model.state_dict()
    assert {original_key(p)[0] for p in shapes} | set(buffers) == set(expected_sd)
    for key, value in buffers.items():
        np.testing.assert_array_equal(value, expected_sd[key].numpy(), err_msg=key)


def test_parity_reduced(small):
    assert_parity(small)


def test_parity_full_size_b3():
    torch.manual_seed(1)
    torch_model = randomise_parameters_and_statistics(twin(B3, num_classes=1000), 224)
    assert_parity(run_both(torch_model, torch_model.state_dict(), {}, 224, batch=1))


def test_round_trip_twin_flax_twin(small):
    """Flax -> a state dict the twin loads strictly (offsets included), bit for bit -> Flax."""
    exported = flax_to_timm(NAME, small["variables"])
    fresh = twin(SMALL)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for key, value in small["torch_model"].state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(),
                                      err_msg=key)
    back = flat(timm_to_flax(NAME, exported, **SMALL))
    assert back.keys() == flat(small["variables"]).keys()
    for path, value in flat(small["variables"]).items():
        np.testing.assert_array_equal(back[path], value, err_msg="/".join(path))


def test_missing_extra_and_wrong_offset_keys_are_listed(small):
    state_dict = {k: v.numpy() for k, v in small["torch_model"].state_dict().items()}
    dropped = "network.2.1.attn.mlp_c.weight"
    with pytest.raises(ConversionError, match="no checkpoint key") as error:
        timm_to_flax(NAME, {k: v for k, v in state_dict.items() if k != dropped}, **SMALL)
    assert "params/stages_1_blocks_1/attn/mlp_c/kernel <- network.2.1.attn.mlp_c.weight" in str(
        error.value)
    with pytest.raises(ConversionError, match="does not use") as error:
        timm_to_flax(NAME, {**state_dict, "network.7.proj.weight": np.zeros(3)}, **SMALL)
    assert "network.7.proj.weight" in str(error.value)

    offset = "network.4.0.attn.sfc_w.offset"
    # Without its offsets a checkpoint still loads (the model computes them) ...
    without = timm_to_flax(NAME, {k: v for k, v in state_dict.items()
                                  if not k.endswith(".offset")}, **SMALL)
    for path, value in flat(small["variables"]).items():
        np.testing.assert_array_equal(flat(without)[path], value)
    # ... but offsets unlike the model's are an error.
    shifted = state_dict[offset].copy()
    shifted[0, 2] += 1.0  # channel 1's dy: 1 -> 2
    with pytest.raises(ConversionError, match="buffers unlike") as error:
        timm_to_flax(NAME, {**state_dict, offset: shifted}, **SMALL)
    assert (f"{offset}: 1 of 48 values differ, the first at (0, 2, 0, 0): checkpoint 2.0, the "
            "model computes 1.0") in str(error.value)


def test_headless_build_gives_the_embedding(small):
    state_dict = {k: v for k, v in small["torch_model"].state_dict().items()
                  if not k.startswith("head.")}
    variables = timm_to_flax(NAME, state_dict, num_classes=0, **SMALL)
    assert "head" not in variables["params"]
    logits, features = apply_converted(NAME, variables, small["images"], **SMALL)
    assert logits is None
    np.testing.assert_allclose(features["embedding"], small["features"]["embedding"],
                               rtol=1e-5, atol=1e-6)


def test_pre_stage_hook_placement(small):
    """Each stage's input after the downsampling that precedes it (the stem for stage 1)."""
    assert_pre_stage_hook_placement(small, (2, 12, 12, 8), after_downsampling=True)


def test_drop_path_only_in_training(small):
    assert_drop_path_only_in_training(small, SMALL)


def test_bfloat16_compute_keeps_float32_params(small):
    assert_bfloat16_compute_keeps_float32_params(small, SMALL)


def test_errors_are_clear(small):
    with pytest.raises(ValueError, match=r"built for NHWC images of shape \[B, 48, 48, 3\]"):
        small["model"].apply(small["variables"], np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="4 stages"):
        jax.eval_shape(create_model(NAME, **{**SMALL, "layers": (1, 1, 1)}).init,
                       jax.random.PRNGKey(0), small["images"])
    with pytest.raises(ConfigError, match="bad overrides"):
        create_model(NAME, depths=(1, 1, 1, 1))  # the original calls them layers
