"""MLP-Mixer / ResMLP: parity with timm 1.0 (logits, embedding, stages), conversion, hooks."""

import flax
import jax
import numpy as np
import pytest

from jaxkd.convert.core import flax_to_timm, timm_to_flax
from jaxkd.convert.timm_import import import_timm
from jaxkd.models import create_model

from timm_parity import (assert_bfloat16_compute_keeps_float32_params,
                         assert_drop_path_only_in_training, assert_head_reinit,
                         assert_keys_listed, assert_parity, assert_pre_stage_hook_placement,
                         assert_registered_like_timm, assert_round_trip, flat, perturbed,
                         run_both)

timm = import_timm()
mixer_module = timm.models.mlp_mixer
Affine, MlpMixer, ResBlock = mixer_module.Affine, mixer_module.MlpMixer, mixer_module.ResBlock

MIXER = "mixer_b16_224"
RESMLP = "resmlp_12_224"
# timm's entry points fix patch_size/num_blocks/embed_dim (overriding them is a TypeError
# there), so reduced variants are built from its MlpMixer class with the entry points' args.
TIMM_ARGS = {
    MIXER: dict(patch_size=16, num_blocks=12, embed_dim=768),
    RESMLP: dict(patch_size=16, num_blocks=12, embed_dim=384, mlp_ratio=4, block_layer=ResBlock,
                 norm_layer=Affine),
}
# Reduced variants with the 0-based stage blocks their depth gives.
REDUCED = {
    MIXER: (dict(img_size=32, patch_size=8, embed_dim=48, num_blocks=4), (0, 1, 2, 3)),
    RESMLP: (dict(img_size=32, patch_size=8, embed_dim=40, num_blocks=6, mlp_ratio=2.0),
             (0, 1, 4, 5)),
}
SMALL = REDUCED[MIXER][0]


def build_timm(name, **kw):
    return MlpMixer(num_classes=10, **{**TIMM_ARGS[name], **kw})


def run_mlp(name, kw, stage_blocks, size, batch=2):
    """A perturbed timm MlpMixer and its converted Flax twin, run on the same images."""
    torch_model = perturbed(build_timm(name, **kw))
    return run_both(name, torch_model, kw, [torch_model.blocks[i] for i in stage_blocks], size,
                    batch)


# ---- parity with timm ----

@pytest.fixture(scope="module")
def small():
    """The reduced Mixer and its timm twin, shared by the parity, conversion, module tests."""
    return run_mlp(MIXER, SMALL, REDUCED[MIXER][1], SMALL["img_size"])


def test_parity_reduced_mixer(small):
    assert_parity(small)


def test_parity_reduced_resmlp():
    kw, stage_blocks = REDUCED[RESMLP]
    assert_parity(run_mlp(RESMLP, kw, stage_blocks, kw["img_size"]))


def test_parity_full_size_resmlp():
    assert_parity(run_mlp(RESMLP, {}, (1, 3, 9, 11), 224, batch=1))


@pytest.mark.parametrize("name", [MIXER, RESMLP])
def test_registration_matches_timm_defaults(name):
    torch_model = timm.create_model(name, pretrained=False, device="meta")
    assert_registered_like_timm(name, "mlp", "mlp", torch_model.pretrained_cfg, torch_model)


# ---- conversion and module behaviour, on the small converted model ----

def test_round_trip_flax_timm_flax(small):
    assert_round_trip(small, SMALL, build_timm(MIXER, **SMALL).eval())


def test_resmlp_keeps_timm_names_and_shapes():
    kw = REDUCED[RESMLP][0]
    state_dict = perturbed(build_timm(RESMLP, **kw)).state_dict()
    variables = flat(timm_to_flax(RESMLP, state_dict, **kw))
    exported = flax_to_timm(RESMLP, flax.traverse_util.unflatten_dict(variables))
    assert exported.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    assert variables[("params", "blocks_0", "norm1", "alpha")].shape == (1, 1, 40)
    assert variables[("params", "blocks_0", "ls1")].shape == (40,)


def test_head_of_another_class_count(small):
    assert_head_reinit(small, SMALL, "head.weight", (48, 5))


def test_missing_and_unknown_keys_are_listed(small):
    assert_keys_listed(small, SMALL, "blocks.1.mlp_tokens.fc2.weight", "blocks.1.extra",
                       "params/blocks_1/mlp_tokens/fc2/kernel <- blocks.1.mlp_tokens.fc2.weight")


def test_pre_stage_hook_placement(small):
    assert_pre_stage_hook_placement(small, (2, 16, 48))  # 4x4 patch tokens, no class token


def test_drop_path_only_in_training(small):
    assert_drop_path_only_in_training(small, SMALL)


def test_bfloat16_compute_keeps_float32_params(small):
    assert_bfloat16_compute_keeps_float32_params(small, SMALL)


def test_errors_are_clear(small):
    with pytest.raises(ValueError, match=r"built for NHWC images of shape \[B, 32, 32, 3\]"):
        small["model"].apply(small["variables"], np.zeros((1, 48, 48, 3), np.float32))
    with pytest.raises(ValueError, match="at least 4 blocks"):
        jax.eval_shape(create_model(MIXER, **{**SMALL, "num_blocks": 3}).init,
                       jax.random.PRNGKey(0), small["images"])
    with pytest.raises(ValueError, match="bad overrides"):
        create_model(MIXER, depth=12)  # timm's MlpMixer calls it num_blocks
    with pytest.raises(ValueError, match="bad overrides"):
        create_model(RESMLP, resmlp=False)
