"""Swin-T/N/P: parity with timm 1.0 (shifted windows, padding, merging), conversion, hooks."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxkd.convert.core import ConversionError, abstract_variables, flax_to_timm, timm_to_flax
from jaxkd.convert.timm_import import import_timm
from jaxkd.models import create_model, model_info

timm = import_timm()
SwinTransformer = timm.models.swin_transformer.SwinTransformer

TINY = "swin_tiny_patch4_window7_224"
NANO = "swin_nano_patch4_window7_224"
PICO = "swin_pico_patch4_window7_224"
# Swin-N/P as the OFA-KD paper defines them; timm has the class but registers no such model.
TIMM_ARGS = {
    NANO: dict(patch_size=4, window_size=7, embed_dim=64, depths=(2, 2, 2, 2),
               num_heads=(2, 4, 8, 16)),
    PICO: dict(patch_size=4, window_size=7, embed_dim=48, depths=(2, 2, 2, 2),
               num_heads=(2, 4, 8, 16)),
}
REDUCED = {
    # An 8x8 map under a 4x4 window: shifted windows and their mask; then one-window stages.
    TINY: dict(img_size=32, window_size=4, embed_dim=16, depths=(2, 1, 1, 1),
               num_heads=(1, 2, 2, 4)),
    # 10x10 and 5x5 maps the 4x4 window does not tile (timm pads), an odd map to merge, and
    # a 3x3 map smaller than the window (one window, no shift).
    NANO: dict(img_size=40, window_size=4, embed_dim=16, depths=(2, 2, 1, 1)),
}
SMALL = REDUCED[TINY]


# ---- helpers (kept per test file: other families' tests are written in parallel) ----

def build_timm(name, num_classes=10, **kw):
    if name in TIMM_ARGS:
        return SwinTransformer(num_classes=num_classes, **{**TIMM_ARGS[name], **kw})
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)


def perturbed_timm(name, num_classes=10, seed=0, **kw):
    """timm model in eval mode with every parameter moved off its (partly zero) init."""
    model = build_timm(name, num_classes, **kw)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def timm_outputs(model, images, stage_modules):
    """(logits, pre-logits embedding, stage outputs) of a timm model, via forward hooks."""
    stages = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: stages.append(out.detach().numpy()))
             for m in stage_modules]
    with torch.no_grad():
        features = model.forward_features(images)
        embedding = model.forward_head(features, pre_logits=True).numpy()
        logits = model.forward_head(features).numpy()
    for hook in hooks:
        hook.remove()
    return logits, embedding, stages


def random_images(size, batch=2, seed=1):
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images, images.permute(0, 2, 3, 1).numpy()


def assert_close(actual, expected, what):
    actual = np.asarray(actual, dtype=np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = float(np.abs(actual - expected).max())
    assert diff <= 1e-4, f"{what}: max abs diff {diff}"


def run_both(name, kw, size, batch=2):
    """A perturbed timm model and its converted Flax twin, run on the same images."""
    torch_model = perturbed_timm(name, **kw)
    images_nchw, images = random_images(size, batch)
    # timm 1.0's stages output NHWC maps, the layout the Flax stages use too.
    expected = timm_outputs(torch_model, images_nchw, torch_model.layers)
    variables = timm_to_flax(name, torch_model.state_dict(), **kw)
    model = create_model(name, num_classes=expected[0].shape[1], **kw)
    logits, features = jax.jit(model.apply)(variables, images)
    return dict(torch_model=torch_model, model=model, variables=variables, images=images,
                logits=logits, features=features, expected=expected)


def assert_parity(run):
    logits, embedding, stages = run["expected"]
    assert_close(run["logits"], logits, "logits")
    assert_close(run["features"]["embedding"], embedding, "embedding")
    assert len(run["features"]["stages"]) == 4
    for i, (ours, theirs) in enumerate(zip(run["features"]["stages"], stages)):
        assert_close(ours, theirs, f"stage {i}")
    # The perturbation must make the comparison meaningful (not ~zero logits).
    assert np.abs(logits).max() > 0.1
    blocks = [block for layer in run["torch_model"].layers for block in layer.blocks]
    assert any(block.attn_mask is not None for block in blocks), "no shifted-window mask used"


def flat(tree):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


# ---- parity with timm ----

@pytest.fixture(scope="module")
def small():
    """The reduced Swin-T and its timm twin, shared by the parity, conversion, module tests."""
    return run_both(TINY, SMALL, SMALL["img_size"])


def test_parity_reduced_swin_tiny(small):
    assert_parity(small)


def test_parity_reduced_swin_nano_with_padding():
    kw = REDUCED[NANO]
    run = run_both(NANO, kw, kw["img_size"])
    assert_parity(run)
    # The case must really exercise timm's padding and whole-map windows.
    blocks = [block for layer in run["torch_model"].layers for block in layer.blocks]
    padded = [b for b in blocks if any(r % w for r, w in zip(b.input_resolution, b.window_size))]
    assert any(any(b.shift_size) for b in padded)
    assert any(b.window_size == (3, 3) and not any(b.shift_size) for b in blocks)


def test_parity_full_size_swin_pico():
    """224 input, default 7x7 windows: shifted masks at 56, 28 and 14, one window at 7."""
    assert_parity(run_both(PICO, {}, 224, batch=1))


@pytest.mark.parametrize("name", [TINY, NANO, PICO])
def test_registration_matches_timm_defaults(name):
    reference_cfg = timm.create_model(TINY, pretrained=False, device="meta").pretrained_cfg
    info = model_info(name)
    assert info.family == "vit" and info.converter == "swin"
    assert info.mean == tuple(reference_cfg["mean"]) and info.std == tuple(reference_cfg["std"])
    assert info.input_size == 224
    expected = sum(p.numel() for p in build_timm(name, 1000, device="meta").parameters())
    shapes = abstract_variables(name, 1000)
    assert set(shapes) == {"params"}
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == expected


# ---- conversion and module behaviour, on the small converted model ----

def test_round_trip_flax_timm_flax(small):
    variables = small["variables"]
    state_dict = flax_to_timm(TINY, variables)
    assert "head.fc.weight" in state_dict
    torch_model = build_timm(TINY, **SMALL).eval()
    torch_model.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(small["images"]).permute(0, 3, 1, 2)).numpy()
    assert_close(small["logits"], expected, "logits of the exported model")
    back = flat(timm_to_flax(TINY, torch_model.state_dict(), **SMALL))
    original = flat(variables)
    assert back.keys() == original.keys()
    for path, value in original.items():
        np.testing.assert_array_equal(back[path], value, err_msg="/".join(path))


def test_derived_buffers_are_ignored(small):
    """Checkpoints written by older timm carry relative_position_index / attn_mask buffers."""
    state_dict = dict(small["torch_model"].state_dict())
    state_dict["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    state_dict["layers.0.blocks.1.attn.relative_position_index"] = torch.zeros(16, 16)
    converted = flat(timm_to_flax(TINY, state_dict, **SMALL))
    for path, value in flat(small["variables"]).items():
        np.testing.assert_array_equal(converted[path], value)


def test_head_of_another_class_count(small):
    state_dict = small["torch_model"].state_dict()
    with pytest.raises(ConversionError, match="head.fc.weight") as error:
        timm_to_flax(TINY, state_dict, num_classes=5, **SMALL)
    assert "head.fc.bias" in str(error.value) and "reinit_head=True" in str(error.value)
    variables = flat(timm_to_flax(TINY, state_dict, num_classes=5, reinit_head=True, **SMALL))
    assert variables[("params", "head", "kernel")].shape == (128, 5)
    same = flat(small["variables"])
    assert variables.keys() == same.keys()
    for path, value in variables.items():
        if path[1] != "head":
            np.testing.assert_array_equal(value, same[path])


def test_missing_and_unknown_keys_are_listed(small):
    state_dict = dict(small["torch_model"].state_dict())
    del state_dict["layers.2.downsample.reduction.weight"]
    state_dict["layers.2.extra.bias"] = torch.zeros(3)
    with pytest.raises(ConversionError) as error:
        timm_to_flax(TINY, state_dict, **SMALL)
    message = str(error.value)
    assert ("params/layers_2/downsample/reduction/kernel <- layers.2.downsample.reduction.weight"
            in message)
    assert "layers.2.extra.bias" in message


def apply_recording_stage_inputs(model, variables, images):
    """Jitted apply with an identity `pre_stage` that returns what it was given."""
    def run(variables, images):
        seen = []

        def record(index, x):
            seen.append((index, x))
            return x

        return model.apply(variables, images, pre_stage=record), seen

    return jax.jit(run)(variables, images)


def test_pre_stage_hook_placement(small):
    model, variables, images = small["model"], small["variables"], small["images"]
    logits, features = small["logits"], small["features"]
    (same_logits, _), seen = apply_recording_stage_inputs(model, variables, images)
    np.testing.assert_array_equal(same_logits, logits)
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert seen[0][1].shape == (2, 8, 8, 16)  # the patch embedding, NHWC
    for index in (1, 2, 3):  # before the stage's patch merging: the previous stage's output
        np.testing.assert_array_equal(seen[index][1], features["stages"][index - 1])

    def add_to_stage_2(index, x):  # not constant over channels, which LayerNorm would undo
        return x + jnp.linspace(0.0, 1.0, x.shape[-1]) if index == 2 else x

    shifted_logits, shifted = jax.jit(lambda v, x: model.apply(
        v, x, pre_stage=add_to_stage_2))(variables, images)
    for index in (0, 1):
        np.testing.assert_array_equal(shifted["stages"][index], features["stages"][index])
    assert not np.allclose(shifted["stages"][2], features["stages"][2])
    assert not np.allclose(shifted_logits, logits)


def test_drop_path_only_in_training(small):
    model = small["model"]  # timm's default drop_path_rate=0.1, matching timm in eval mode
    assert model.drop_path_rate == 0.1
    variables, images = small["variables"], small["images"]
    train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key})[0])
    first = train(variables, images, jax.random.PRNGKey(1))
    assert not np.allclose(first, train(variables, images, jax.random.PRNGKey(2)))
    assert not np.allclose(first, small["logits"])


def test_bfloat16_compute_keeps_float32_params(small):
    model = create_model(TINY, num_classes=10, dtype=jnp.bfloat16, **SMALL)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), small["images"])))
    logits = jax.jit(model.apply)(small["variables"], small["images"])[0]
    assert logits.dtype == jnp.bfloat16
    expected = small["logits"]
    scale = float(np.abs(expected).max())
    assert float(np.abs(np.asarray(logits, np.float32) - expected).max()) < 0.05 * scale


def test_errors_are_clear(small):
    with pytest.raises(ValueError, match=r"built for NHWC images of shape \[B, 32, 32, 3\]"):
        small["model"].apply(small["variables"], np.zeros((1, 56, 56, 3), np.float32))

    def init(**kw):
        model = create_model(TINY, **{**SMALL, **kw})
        size = model.img_size
        return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                              np.zeros((1, size, size, 3), np.float32))

    with pytest.raises(ValueError, match="smaller than patch_size"):
        init(img_size=2)
    with pytest.raises(ValueError, match="window_size must be positive"):
        init(window_size=0)
    with pytest.raises(ValueError, match="per-stage window sizes are not supported"):
        init(window_size=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="4 stages"):
        init(depths=(2, 2, 2))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        init(num_heads=(5, 2, 3, 4))
    with pytest.raises(ValueError, match="bad overrides"):
        create_model(TINY, depth=12)
