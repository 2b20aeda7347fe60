"""ViP-S/7 (OFA-KD's Vision Permutator) against a PyTorch twin written here from the architecture
of Hao840/OFAKD custom_model/vip.py, with its module names (so its state dict has that code's
keys) and its stage outputs (custom_forward/vip.py): parity of logits, embedding and the four
stages, conversion both ways, the parameter count and stage shapes of the original size."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxkd.convert import converter_for, read_state_dict, timm_to_flax
from jaxkd.convert.core import abstract_variables
from jaxkd.convert.timm_import import import_timm
from jaxkd.models import create_model, model_info
from jaxkd.models.vip import PermutatorBlock

from timm_parity import (apply_recording_stage_inputs,
                         assert_bfloat16_compute_keeps_float32_params, assert_close,
                         assert_drop_path_only_in_training, assert_keys_listed, assert_parity,
                         assert_pre_stage_hook_placement, assert_round_trip, flat,
                         parameter_count, random_images, randomise_parameters_and_statistics)

DropPath = import_timm().layers.DropPath

NAME = "vip_s7"
NUM_CLASSES = 10
VIP_S7 = dict(layers=(4, 3, 8, 3), patch_size=7, embed_dims=(192, 384, 384, 384),
              transitions=(True, False, False, False), segment_dim=(32, 16, 16, 16),
              mlp_ratios=(3, 3, 3, 3))
# Measured on the twin at 1000 classes (the ViP paper: 25M).
VIP_S7_PARAMETERS = 25_114_984
# A reduced ViP with all three kinds of stage boundary: a 2x2 Downsample (network.1), none
# (stages 2 -> 3: same grid and width) and a 1x1 one where only the width changes (network.4).
# Grids 8, 4, 4, 4 at 56 px; each stage's segment_dim is its grid.
SMALL = dict(img_size=56, layers=(2, 1, 1, 1), embed_dims=(16, 24, 24, 32),
             segment_dim=(8, 4, 4, 4), mlp_ratios=(3, 2, 3, 3), skip_lam=2.0)
SMALL_TWIN = dict(VIP_S7, **SMALL)


# ---------------------------------------------------------------------------------- the twin

class TorchMlp(torch.nn.Module):
    def __init__(self, dim, hidden, out):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TorchPermuteMLP(torch.nn.Module):
    """Height/width mixing written as a contraction with the Linear weight viewed per
    (position, segment offset), not as the original's permute-reshape: an independent check."""

    def __init__(self, dim, segment_dim):
        super().__init__()
        self.segment_dim = segment_dim
        self.mlp_c, self.mlp_h, self.mlp_w = (torch.nn.Linear(dim, dim, bias=False)
                                              for _ in range(3))
        self.reweight = TorchMlp(dim, dim // 4, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, h, w, c = x.shape
        s = c // self.segment_dim
        segments = x.view(b, h, w, self.segment_dim, s)
        # out[.., h', .., g, s'] = sum_{h, s} W[h' * S + s', h * S + s] x[.., h, .., g, s]
        mixed_h = torch.einsum("pqis,biwgs->bpwgq", self.mlp_h.weight.view(h, s, h, s), segments)
        mixed_w = torch.einsum("pqis,bhigs->bhpgq", self.mlp_w.weight.view(w, s, w, s), segments)
        mixed_h, mixed_w = mixed_h.reshape(b, h, w, c), mixed_w.reshape(b, h, w, c)
        mixed_c = self.mlp_c(x)
        weights = self.reweight((mixed_h + mixed_w + mixed_c).mean(dim=(1, 2)))
        weights = weights.view(b, c, 3).softmax(-1)[:, None, None]
        return self.proj(mixed_h * weights[..., 0] + mixed_w * weights[..., 1]
                         + mixed_c * weights[..., 2])


class TorchBlock(torch.nn.Module):
    def __init__(self, dim, segment_dim, mlp_ratio, skip_lam, drop_path):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = TorchPermuteMLP(dim, segment_dim)
        self.mlp = TorchMlp(dim, int(dim * mlp_ratio), dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else torch.nn.Identity()
        self.skip_lam = skip_lam

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam


class TorchPatchConv(torch.nn.Module):
    """PatchEmbed (on NCHW images) and Downsample (on NHWC grids): one strided `proj` conv."""

    def __init__(self, cin, cout, patch):
        super().__init__()
        self.proj = torch.nn.Conv2d(cin, cout, patch, patch)

    def forward(self, x):
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class TorchViP(torch.nn.Module):
    """`network` holds each stage's blocks (a Sequential) and, after it, a Downsample where the
    stage is a transition (2x2) or the width changes (1x1)."""

    def __init__(self, layers, patch_size, embed_dims, transitions, segment_dim, mlp_ratios,
                 img_size=224, skip_lam=1.0, drop_path_rate=0.0, num_classes=NUM_CLASSES):
        super().__init__()
        self.patch_embed = TorchPatchConv(3, embed_dims[0], patch_size)
        total, network = sum(layers), []
        for i, depth in enumerate(layers):
            network.append(torch.nn.Sequential(*[
                TorchBlock(embed_dims[i], segment_dim[i], mlp_ratios[i], skip_lam,
                           drop_path_rate * (sum(layers[:i]) + j) / (total - 1))
                for j in range(depth)]))
            if i < len(layers) - 1 and (transitions[i] or embed_dims[i] != embed_dims[i + 1]):
                network.append(TorchPatchConv(embed_dims[i], embed_dims[i + 1],
                                              2 if transitions[i] else 1))
        self.network = torch.nn.ModuleList(network)
        self.stage_entries = [i for i, m in enumerate(network)
                              if isinstance(m, torch.nn.Sequential)]
        self.norm = torch.nn.LayerNorm(embed_dims[-1])
        self.head = torch.nn.Linear(embed_dims[-1], num_classes)

    def forward_with_features(self, images):
        """(logits, embedding, the [B, L, C] outputs of the four stages)."""
        x = self.patch_embed(images.permute(0, 2, 3, 1))
        stages = []
        for index, module in enumerate(self.network):
            x = module(x)
            if index in self.stage_entries:
                stages.append(x.flatten(1, 2))
        embedding = self.norm(stages[-1]).mean(1)
        return self.head(embedding), embedding, stages

    def forward(self, images):
        return self.forward_with_features(images)[0]


def block_drop_path_rates(twin):
    return [block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0
            for stage in twin.network if isinstance(stage, torch.nn.Sequential)
            for block in stage]


# ---------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A randomised reduced twin, saved with torch.save and read back through read_state_dict,
    and its converted (jitted) Flax model on the same images."""
    torch.manual_seed(0)
    twin = randomise_parameters_and_statistics(TorchViP(**SMALL_TWIN), SMALL["img_size"])
    path = tmp_path_factory.mktemp("vip") / "vip_small.pth"
    torch.save(twin.state_dict(), path)
    variables = timm_to_flax(NAME, read_state_dict(path), **SMALL)
    images_nchw, images = random_images(SMALL["img_size"])
    with torch.no_grad():
        logits, embedding, stages = twin.forward_with_features(images_nchw)
    model = create_model(NAME, num_classes=NUM_CLASSES, **SMALL)
    ours, features = jax.jit(model.apply)(variables, images)
    return dict(name=NAME, torch_model=twin, model=model, variables=variables, images=images,
                logits=ours, features=features,
                expected=(logits.numpy(), embedding.numpy(), [s.numpy() for s in stages]))


def test_parity_with_the_twin(small):
    assert [tuple(s.shape) for s in small["features"]["stages"]] == [
        (2, 64, 16), (2, 16, 24), (2, 16, 24), (2, 16, 32)]
    assert_parity(small)


def test_vip_s7_parameter_count_stage_shapes_and_keys():
    """The original size: the twin's parameter count (the published 25M), its state-dict keys,
    and custom_forward's stage_info shapes at 224 px."""
    info = model_info(NAME)
    assert (info.family, info.token_stages, info.input_size) == ("mlp", True, 224)
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    twin = TorchViP(**VIP_S7, num_classes=1000)
    assert twin.stage_entries == [0, 2, 3, 4]
    assert sum(p.numel() for p in twin.parameters()) == VIP_S7_PARAMETERS
    shapes = abstract_variables(NAME, 1000)
    assert set(shapes) == {"params"} and parameter_count(shapes) == VIP_S7_PARAMETERS
    vip_key = converter_for(NAME).timm_key
    assert {vip_key(path)[0] for path in flat(shapes)} == set(twin.state_dict())

    model = create_model(NAME)
    _, features = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x)[0],
                                 jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert [s.shape[1:] for s in features["stages"]] == [(1024, 192)] + [(256, 384)] * 3
    assert features["embedding"].shape == (2, 384)


def test_round_trip_flax_state_dict_flax(small):
    exported = assert_round_trip(small, SMALL, TorchViP(**SMALL_TWIN).eval())
    assert exported.keys() == small["torch_model"].state_dict().keys()


def test_missing_and_unknown_keys_are_listed(small):
    assert_keys_listed(small, SMALL, "network.4.proj.weight", "network.6.0.norm1.weight",
                       "params/network_4/proj/kernel <- network.4.proj.weight")


def test_pre_stage_hook_placement(small):
    """Each stage's hook sees [B, L, C] tokens after the Downsample before it (stage 3 has
    none: its input is stage 2's output)."""
    assert_pre_stage_hook_placement(small, (2, 64, 16), after_downsampling=True)
    _, seen = apply_recording_stage_inputs(small["model"], small["variables"], small["images"])
    np.testing.assert_array_equal(seen[2][1], small["features"]["stages"][1])


def test_drop_path_only_in_training(small):
    assert_drop_path_only_in_training(small, SMALL)


def test_drop_path_rates_follow_the_original_rule(small):
    """Block k of n drops with rate * k / (n - 1), as the original's basic_blocks."""
    twin = TorchViP(**SMALL_TWIN, drop_path_rate=0.3)
    rates = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, PermutatorBlock) and context.method_name == "__call__":
            rates.append(context.module.drop_path_rate)
        return next_fun(*args, **kwargs)

    model = create_model(NAME, num_classes=NUM_CLASSES, drop_path_rate=0.3, **SMALL)
    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), small["images"])
    assert len(rates) == sum(SMALL["layers"])
    np.testing.assert_allclose(rates, block_drop_path_rates(twin), rtol=1e-12)


def test_headless_model(small):
    """num_classes=0: no head; the state dict without it converts, and the 'logits' are the
    embedding."""
    state_dict = {k: v for k, v in small["torch_model"].state_dict().items()
                  if not k.startswith("head.")}
    variables = timm_to_flax(NAME, state_dict, num_classes=0, **SMALL)
    assert "head" not in variables["params"]
    logits, features = create_model(NAME, num_classes=0, **SMALL).apply(variables,
                                                                        small["images"])
    np.testing.assert_array_equal(logits, features["embedding"])
    assert_close(features["embedding"], small["expected"][1], "headless embedding")


def test_bfloat16_compute_keeps_float32_params(small):
    assert_bfloat16_compute_keeps_float32_params(small, SMALL)


def test_initialisation_is_the_originals(small):
    """Linear: trunc-normal(.02) weights, zero biases; LayerNorm: ones/zeros; the patch and
    Downsample convs keep PyTorch's default (uniform within 1/sqrt(fan_in), bias too)."""
    model = create_model(NAME, num_classes=NUM_CLASSES, **SMALL)
    params = flat(jax.jit(model.init)(jax.random.PRNGKey(0), small["images"])["params"])
    convs = {("patch_embed", "proj"): 3 * 7 * 7, ("network_1", "proj"): 16 * 2 * 2,
             ("network_4", "proj"): 24}
    for path, value in params.items():
        value, module, leaf = np.asarray(value), path[:-1], path[-1]
        if module in convs:
            bound = convs[module] ** -0.5
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.8 * bound, path
        elif module[-1].startswith("norm"):
            assert np.all(value == (1.0 if leaf == "scale" else 0.0)), path
        elif leaf == "bias":
            assert np.all(value == 0), path
        else:
            assert value.ndim == 2 and 0.015 < value.std() < 0.025, path
            assert np.abs(value).max() <= 2 * 0.02 / 0.87, path  # truncated at 2 std
    assert sum(module in convs for module in {p[:-1] for p in params}) == 3


def test_configuration_errors_are_clear(small):
    images = small["images"]

    def init(**overrides):
        model = create_model(NAME, num_classes=NUM_CLASSES, **{**SMALL, **overrides})
        jax.eval_shape(model.init, jax.random.PRNGKey(0), images)

    with pytest.raises(ValueError, match=r"stage 2 of 4: its 4x4 token grid and width 24 do "
                                         r"not fit segment_dim=8"):
        init(segment_dim=(8, 8, 4, 4))
    with pytest.raises(ValueError, match=r"stage 4 of 4: its 4x4 token grid and width 30 do "
                                         r"not fit segment_dim=4"):
        init(embed_dims=(16, 24, 24, 30))
    with pytest.raises(ValueError, match="layers needs 4 entries"):
        init(layers=(2, 1, 1))
    with pytest.raises(ValueError, match="at least one block"):
        init(layers=(2, 0, 1, 1))
    with pytest.raises(ValueError, match=r"built for NHWC images of shape \[B, 56, 56, 3\]"):
        small["model"].apply(small["variables"], np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="bad overrides"):
        create_model(NAME, depths=(2, 2, 2, 2))
