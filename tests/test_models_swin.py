"""Swin-T/N/P: parity with timm 1.0 (shifted windows, padding, merging), conversion, hooks."""

import jax
import numpy as np
import pytest
import torch

from jaxkd.convert.core import timm_to_flax
from jaxkd.convert.timm_import import import_timm
from jaxkd.models import create_model

from timm_parity import (assert_bfloat16_compute_keeps_float32_params,
                         assert_drop_path_random_in_training, assert_head_reinit,
                         assert_keys_listed, assert_parity, assert_pre_stage_hook_placement,
                         assert_registered_like_timm, assert_round_trip, flat, perturbed,
                         run_both)

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


def build_timm(name, num_classes=10, **kw):
    if name in TIMM_ARGS:
        return SwinTransformer(num_classes=num_classes, **{**TIMM_ARGS[name], **kw})
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)


def run_swin(name, kw, size, batch=2):
    """A perturbed timm Swin and its converted Flax twin, run on the same images."""
    torch_model = perturbed(build_timm(name, **kw))
    # timm 1.0's stages output NHWC maps, the layout the Flax stages use too.
    return run_both(name, torch_model, kw, torch_model.layers, size, batch)


def assert_swin_parity(run):
    """Parity, in a run whose timm twin really used shifted-window attention masks."""
    assert_parity(run)
    blocks = [block for layer in run["torch_model"].layers for block in layer.blocks]
    assert any(block.attn_mask is not None for block in blocks), "no shifted-window mask used"


# ---- parity with timm ----

@pytest.fixture(scope="module")
def small():
    """The reduced Swin-T and its timm twin, shared by the parity, conversion, module tests."""
    return run_swin(TINY, SMALL, SMALL["img_size"])


def test_parity_reduced_swin_tiny(small):
    assert_swin_parity(small)


def test_parity_reduced_swin_nano_with_padding():
    kw = REDUCED[NANO]
    run = run_swin(NANO, kw, kw["img_size"])
    assert_swin_parity(run)
    # The case must really exercise timm's padding and whole-map windows.
    blocks = [block for layer in run["torch_model"].layers for block in layer.blocks]
    padded = [b for b in blocks if any(r % w for r, w in zip(b.input_resolution, b.window_size))]
    assert any(any(b.shift_size) for b in padded)
    assert any(b.window_size == (3, 3) and not any(b.shift_size) for b in blocks)


def test_parity_full_size_swin_pico():
    """224 input, default 7x7 windows: shifted masks at 56, 28 and 14, one window at 7."""
    assert_swin_parity(run_swin(PICO, {}, 224, batch=1))


@pytest.mark.parametrize("name", [TINY, NANO, PICO])
def test_registration_matches_timm_defaults(name):
    reference_cfg = timm.create_model(TINY, pretrained=False, device="meta").pretrained_cfg
    assert reference_cfg["input_size"][-1] == 224
    assert_registered_like_timm(name, "vit", "swin", reference_cfg,
                                build_timm(name, 1000, device="meta"))


# ---- conversion and module behaviour, on the small converted model ----

def test_round_trip_flax_timm_flax(small):
    state_dict = assert_round_trip(small, SMALL, build_timm(TINY, **SMALL).eval())
    assert "head.fc.weight" in state_dict


def test_derived_buffers_are_ignored(small):
    """Checkpoints written by older timm carry relative_position_index / attn_mask buffers."""
    state_dict = dict(small["torch_model"].state_dict())
    state_dict["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    state_dict["layers.0.blocks.1.attn.relative_position_index"] = torch.zeros(16, 16)
    converted = flat(timm_to_flax(TINY, state_dict, **SMALL))
    for path, value in flat(small["variables"]).items():
        np.testing.assert_array_equal(converted[path], value)


def test_head_of_another_class_count(small):
    assert_head_reinit(small, SMALL, "head.fc.weight", (128, 5))


def test_missing_and_unknown_keys_are_listed(small):
    assert_keys_listed(
        small, SMALL, "layers.2.downsample.reduction.weight", "layers.2.extra.bias",
        "params/layers_2/downsample/reduction/kernel <- layers.2.downsample.reduction.weight")


def test_pre_stage_hook_placement(small):
    # Stage k's input is taken after its patch merging, before its first block: where the
    # original Swin (and timm 0.6.5) begins a stage, and where PAT's official code prompts.
    assert_pre_stage_hook_placement(small, (2, 8, 8, 16),  # the patch embedding, NHWC
                                    after_downsampling=True)


def test_drop_path_only_in_training(small):
    model = small["model"]  # timm's default drop_path_rate=0.1, matching timm in eval mode
    assert model.drop_path_rate == 0.1
    assert_drop_path_random_in_training(model, small)


def test_bfloat16_compute_keeps_float32_params(small):
    assert_bfloat16_compute_keeps_float32_params(small, SMALL)


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
