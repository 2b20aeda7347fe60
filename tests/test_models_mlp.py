"""MLP-Mixer / ResMLP: parity with timm 1.0 (logits, embedding, stages), conversion, hooks."""

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


# ---- helpers (kept per test file: other families' tests are written in parallel) ----

def perturbed_timm(name, num_classes=10, seed=0, **kw):
    """timm model in eval mode with every parameter moved off its (partly zero) init."""
    model = MlpMixer(num_classes=num_classes, **{**TIMM_ARGS[name], **kw})
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


def run_both(name, kw, stage_blocks, size, batch=2):
    """A perturbed timm model and its converted Flax twin, run on the same images."""
    torch_model = perturbed_timm(name, **kw)
    images_nchw, images = random_images(size, batch)
    expected = timm_outputs(torch_model, images_nchw,
                            [torch_model.blocks[i] for i in stage_blocks])
    variables = timm_to_flax(name, torch_model.state_dict(), **kw)
    model = create_model(name, num_classes=expected[0].shape[1], **kw)
    logits, features = jax.jit(model.apply)(variables, images)
    return dict(name=name, torch_model=torch_model, model=model, variables=variables,
                images=images, logits=logits, features=features, expected=expected)


def assert_parity(run):
    logits, embedding, stages = run["expected"]
    assert_close(run["logits"], logits, "logits")
    assert_close(run["features"]["embedding"], embedding, "embedding")
    assert len(run["features"]["stages"]) == 4
    for i, (ours, theirs) in enumerate(zip(run["features"]["stages"], stages)):
        assert_close(ours, theirs, f"stage {i}")
    # The perturbation must make the comparison meaningful (not ~zero logits).
    assert np.abs(logits).max() > 0.1


def flat(tree):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


# ---- parity with timm ----

@pytest.fixture(scope="module")
def small():
    """The reduced Mixer and its timm twin, shared by the parity, conversion, module tests."""
    return run_both(MIXER, SMALL, REDUCED[MIXER][1], SMALL["img_size"])


def test_parity_reduced_mixer(small):
    assert_parity(small)


def test_parity_reduced_resmlp():
    kw, stage_blocks = REDUCED[RESMLP]
    assert_parity(run_both(RESMLP, kw, stage_blocks, kw["img_size"]))


def test_parity_full_size_resmlp():
    assert_parity(run_both(RESMLP, {}, (1, 3, 9, 11), 224, batch=1))


@pytest.mark.parametrize("name", [MIXER, RESMLP])
def test_registration_matches_timm_defaults(name):
    torch_model = timm.create_model(name, pretrained=False, device="meta")
    info = model_info(name)
    assert info.family == "mlp" and info.converter == "mlp"
    assert info.mean == tuple(torch_model.pretrained_cfg["mean"])
    assert info.std == tuple(torch_model.pretrained_cfg["std"])
    assert info.input_size == torch_model.pretrained_cfg["input_size"][-1]
    expected = sum(p.numel() for p in torch_model.parameters())
    shapes = abstract_variables(name, 1000)
    assert set(shapes) == {"params"}
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == expected


# ---- conversion and module behaviour, on the small converted model ----

def test_round_trip_flax_timm_flax(small):
    variables = small["variables"]
    state_dict = flax_to_timm(MIXER, variables)
    torch_model = MlpMixer(num_classes=10, **{**TIMM_ARGS[MIXER], **SMALL}).eval()
    torch_model.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(small["images"]).permute(0, 3, 1, 2)).numpy()
    assert_close(small["logits"], expected, "logits of the exported model")
    back = flat(timm_to_flax(MIXER, torch_model.state_dict(), **SMALL))
    original = flat(variables)
    assert back.keys() == original.keys()
    for path, value in original.items():
        np.testing.assert_array_equal(back[path], value, err_msg="/".join(path))


def test_resmlp_keeps_timm_names_and_shapes():
    kw = REDUCED[RESMLP][0]
    state_dict = perturbed_timm(RESMLP, **kw).state_dict()
    variables = flat(timm_to_flax(RESMLP, state_dict, **kw))
    exported = flax_to_timm(RESMLP, flax.traverse_util.unflatten_dict(variables))
    assert exported.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    assert variables[("params", "blocks_0", "norm1", "alpha")].shape == (1, 1, 40)
    assert variables[("params", "blocks_0", "ls1")].shape == (40,)


def test_head_of_another_class_count(small):
    state_dict = small["torch_model"].state_dict()
    with pytest.raises(ConversionError, match="head.weight") as error:
        timm_to_flax(MIXER, state_dict, num_classes=5, **SMALL)
    assert "head.bias" in str(error.value) and "reinit_head=True" in str(error.value)
    variables = flat(timm_to_flax(MIXER, state_dict, num_classes=5, reinit_head=True, **SMALL))
    assert variables[("params", "head", "kernel")].shape == (48, 5)
    same = flat(small["variables"])
    assert variables.keys() == same.keys()
    for path, value in variables.items():
        if path[1] != "head":
            np.testing.assert_array_equal(value, same[path])


def test_missing_and_unknown_keys_are_listed(small):
    state_dict = dict(small["torch_model"].state_dict())
    del state_dict["blocks.1.mlp_tokens.fc2.weight"]
    state_dict["blocks.1.extra"] = torch.zeros(3)
    with pytest.raises(ConversionError) as error:
        timm_to_flax(MIXER, state_dict, **SMALL)
    message = str(error.value)
    assert "params/blocks_1/mlp_tokens/fc2/kernel <- blocks.1.mlp_tokens.fc2.weight" in message
    assert "blocks.1.extra" in message


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
    assert seen[0][1].shape == (2, 16, 48)  # 4x4 patch tokens, no class token
    for index in (1, 2, 3):  # stage k starts right after stage k-1 ends
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
    model = create_model(MIXER, num_classes=10, drop_path_rate=0.5, **SMALL)
    variables, images = small["variables"], small["images"]
    np.testing.assert_array_equal(jax.jit(model.apply)(variables, images)[0], small["logits"])
    train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key})[0])
    first = train(variables, images, jax.random.PRNGKey(1))
    assert not np.allclose(first, train(variables, images, jax.random.PRNGKey(2)))
    assert not np.allclose(first, small["logits"])


def test_bfloat16_compute_keeps_float32_params(small):
    model = create_model(MIXER, num_classes=10, dtype=jnp.bfloat16, **SMALL)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), small["images"])))
    logits = jax.jit(model.apply)(small["variables"], small["images"])[0]
    assert logits.dtype == jnp.bfloat16
    expected = small["logits"]
    scale = float(np.abs(expected).max())
    assert float(np.abs(np.asarray(logits, np.float32) - expected).max()) < 0.05 * scale


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
