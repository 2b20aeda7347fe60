"""ViT/DeiT: parity with timm 1.0 (logits, embedding, stages), conversion, stages, hooks."""

import jax
import numpy as np
import pytest

from jaxkd.convert.timm_import import import_timm
from jaxkd.models import create_model
from jaxkd.models.vit import stage_end_blocks, stage_start_blocks

from timm_parity import (assert_bfloat16_compute_keeps_float32_params,
                         assert_drop_path_only_in_training, assert_head_reinit,
                         assert_keys_listed, assert_parity, assert_pre_stage_hook_placement,
                         assert_registered_like_timm, assert_round_trip, perturbed, run_both)

timm = import_timm()

NAMES = ["deit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]
# Reduced variants through timm's own keywords, with the 0-based stage blocks the depth gives.
REDUCED = {
    "deit_tiny_patch16_224": (dict(img_size=32, patch_size=8, embed_dim=48, depth=4,
                                   num_heads=3), (0, 1, 2, 3)),
    "vit_small_patch16_224": (dict(img_size=48, depth=6, embed_dim=64, num_heads=4),
                              (0, 1, 4, 5)),
    "vit_base_patch16_224": (dict(img_size=32, patch_size=16, embed_dim=96, depth=5,
                                  num_heads=12, mlp_ratio=2.0), (0, 1, 3, 4)),
}
SMALL = REDUCED["deit_tiny_patch16_224"][0]


def run_vit(name, kw, stage_blocks, size, batch=2):
    """A perturbed timm ViT and its converted Flax twin, run on the same images."""
    torch_model = perturbed(timm.create_model(name, pretrained=False, num_classes=10, **kw))
    return run_both(name, torch_model, kw, [torch_model.blocks[i] for i in stage_blocks], size,
                    batch)


# ---- stages ----

def test_stage_rule_matches_reference_and_stays_distinct():
    assert stage_end_blocks(12) == (1, 3, 9, 11)
    assert stage_start_blocks(12) == (0, 2, 4, 10)
    assert stage_end_blocks(4) == (0, 1, 2, 3)
    assert stage_end_blocks(24) == (3, 7, 19, 23)
    for depth in range(4, 40):
        ends = stage_end_blocks(depth)
        assert len(ends) == 4 and ends[-1] == depth - 1
        assert list(ends) == sorted(set(ends)), (depth, ends)
    with pytest.raises(ValueError, match="at least 4 blocks"):
        stage_end_blocks(3)


# ---- parity with timm ----

@pytest.fixture(scope="module")
def small():
    """The reduced DeiT and its timm twin, shared by the parity, conversion and module tests."""
    return run_vit("deit_tiny_patch16_224", SMALL, REDUCED["deit_tiny_patch16_224"][1],
                    SMALL["img_size"])


def test_parity_reduced_deit_tiny(small):
    assert_parity(small)


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224"])
def test_parity_reduced(name):
    kw, stage_blocks = REDUCED[name]
    assert_parity(run_vit(name, kw, stage_blocks, kw["img_size"]))


def test_parity_full_size_deit_tiny():
    assert_parity(run_vit("deit_tiny_patch16_224", {}, (1, 3, 9, 11), 224, batch=1))


@pytest.mark.parametrize("name", NAMES)
def test_registration_matches_timm_defaults(name):
    torch_model = timm.create_model(name, pretrained=False, device="meta")
    assert_registered_like_timm(name, "vit", "vit", torch_model.pretrained_cfg, torch_model)


# ---- conversion and module behaviour, on the small converted model ----

def test_round_trip_flax_timm_flax(small):
    fresh = timm.create_model(small["name"], pretrained=False, num_classes=10, **SMALL).eval()
    assert_round_trip(small, SMALL, fresh)


def test_head_of_another_class_count(small):
    assert_head_reinit(small, SMALL, "head.weight", (48, 5))


def test_missing_and_unknown_keys_are_listed(small):
    assert_keys_listed(small, SMALL, "blocks.2.attn.qkv.bias", "blocks.2.attn.extra.weight",
                       "params/blocks_2/attn/qkv/bias <- blocks.2.attn.qkv.bias")


def test_pre_stage_hook_placement(small):
    assert_pre_stage_hook_placement(small, (2, 17, 48))  # class token + 4x4 patches


def test_drop_path_only_in_training(small):
    assert_drop_path_only_in_training(small, SMALL)


def test_bfloat16_compute_keeps_float32_params(small):
    assert_bfloat16_compute_keeps_float32_params(small, SMALL)


def test_errors_are_clear(small):
    with pytest.raises(ValueError, match=r"built for NHWC images of shape \[B, 32, 32, 3\]"):
        small["model"].apply(small["variables"], np.zeros((1, 48, 48, 3), np.float32))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        jax.eval_shape(create_model("deit_tiny_patch16_224", embed_dim=50, num_heads=3).init,
                       jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.float32))
    with pytest.raises(ValueError, match="bad overrides"):
        create_model("deit_tiny_patch16_224", depths=(2, 2))
