"""CNN families (ResNet, MobileNetV2, ConvNeXt) against timm: parity, counts, conversion."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxkd.convert import ConversionError, flax_to_timm, timm_to_flax
from jaxkd.convert.core import abstract_variables
from jaxkd.convert.timm_import import import_timm
from jaxkd.models import create_model, model_info

from timm_parity import (assert_parity, flat, max_diff, parameter_count,
                         randomise_parameters_and_statistics, scaled_tolerance, timm_outputs)

timm = import_timm()

NUM_CLASSES = 10
# (name, timm keyword overrides, image size): reduced runs, batch 2. Bottleneck ResNet-50 and
# MobileNetV2 (which has no timm size keyword) are covered by the full-size runs below.
REDUCED = [
    ("resnet18", {}, 64),
    ("resnet34", {"layers": (1, 2, 1, 1)}, 32),
    ("convnext_tiny", {"depths": (1, 1, 2, 1), "dims": (16, 24, 32, 40)}, 64),
]
REDUCED_IDS = [name for name, _, _ in REDUCED]
# One model per converter family, for the tests that exercise the converter, not the model.
PER_FAMILY = [REDUCED[0], ("mobilenetv2_100", {}, 32), REDUCED[2]]
PER_FAMILY_IDS = [name for name, _, _ in PER_FAMILY]
HEAD_KEYS = {"resnet18": "fc.weight", "mobilenetv2_100": "classifier.weight",
             "convnext_tiny": "head.fc.weight"}


# ---------------------------------------------------------------------------- timm side helpers

def _stage_modules(name, model):
    """The timm modules whose outputs are the four distillation stages."""
    if name.startswith("resnet"):
        return [model.layer1, model.layer2, model.layer3, model.layer4]
    if name.startswith("mobilenetv2"):
        return [model.blocks[1], model.blocks[2], model.blocks[4], model.bn2]
    return list(model.stages)


def _perturbed_timm_model(name, size, num_classes=NUM_CLASSES, seed=0, **kw):
    """A timm model whose every parameter and BN statistic is random (no zero/one inits)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
    return randomise_parameters_and_statistics(model, size)


def _random_images(size, batch, seed=0):
    images = torch.from_numpy(np.random.default_rng(seed).normal(
        size=(batch, 3, size, size)).astype(np.float32))
    return images, jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def _state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _random_variables(model, images, seed=0):
    """Random variables of the model's shapes, every leaf non-trivial (no zero-init scales).

    Filled from numpy: Flax's jitted `init` costs tens of seconds of RNG compilation on CPU.
    """
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1] == "kernel":
            return rng.normal(0.0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape)
        if path[-1] in ("var", "scale", "gamma"):
            return rng.uniform(0.5, 1.5, leaf.shape)
        return rng.normal(0.0, 0.1, leaf.shape)

    return flax.traverse_util.unflatten_dict(
        {path: jnp.asarray(fill(path, leaf), jnp.float32) for path, leaf in flat(shapes).items()})


def _assert_parity(name, kw, size, batch, num_classes):
    model = _perturbed_timm_model(name, size, num_classes=num_classes, **kw)
    variables = timm_to_flax(name, _state_dict(model), **kw)
    images_nchw, images = _random_images(size, batch)
    expected = timm_outputs(model, images_nchw, _stage_modules(name, model), nchw_stages=True)
    logits, features = create_model(name, num_classes=num_classes, **kw).apply(variables, images)
    assert logits.shape == (batch, num_classes)
    assert np.std(expected[0]) > 0.1, "degenerate reference: logits carry no signal"
    # Un-normalised (BatchNorm) stage maps: a tolerance relative to their scale.
    assert_parity(dict(logits=logits, features=features, expected=expected),
                  feature_tolerance=scaled_tolerance)


# ----------------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("name,kw,size", REDUCED, ids=REDUCED_IDS)
def test_parity_with_timm_reduced(name, kw, size):
    _assert_parity(name, kw, size, batch=2, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2_100", "convnext_tiny"])
def test_parity_with_timm_full_size(name):
    size = model_info(name).input_size
    assert size == 224
    _assert_parity(name, {}, size, batch=1, num_classes=1000)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "mobilenetv2_100",
                                  "convnext_tiny"])
def test_parameter_count_equals_timm(name):
    timm_count = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    shapes = abstract_variables(name, 1000)
    assert parameter_count(shapes["params"]) == timm_count
    # Only BatchNorm models carry running statistics.
    assert ("batch_stats" in shapes) == (name != "convnext_tiny")


def test_stage_channels_and_strides():
    expected = {"resnet18": (64, 128, 256, 512), "resnet50": (256, 512, 1024, 2048),
                "mobilenetv2_100": (24, 32, 96, 1280), "convnext_tiny": (96, 192, 384, 768)}
    for name, channels in expected.items():
        model = create_model(name, num_classes=NUM_CLASSES)
        out = jax.eval_shape(lambda x, m=model: m.init_with_output(
            jax.random.PRNGKey(0), x)[0], jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
        _, features = out
        assert [s.shape for s in features["stages"]] == [
            (1, 64 // stride, 64 // stride, c) for stride, c in zip((4, 8, 16, 32), channels)]
        assert features["embedding"].shape == (1, channels[-1])


@pytest.mark.parametrize("name,kw,size", PER_FAMILY, ids=PER_FAMILY_IDS)
def test_round_trip(name, kw, size):
    model = _perturbed_timm_model(name, size, **kw)
    variables = timm_to_flax(name, _state_dict(model), **kw)
    exported = flax_to_timm(name, variables)
    fresh = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kw)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy())
    again = timm_to_flax(name, exported, **kw)
    original, back = flat(variables), flat(again)
    assert original.keys() == back.keys()
    for path, value in original.items():
        np.testing.assert_array_equal(back[path], value)


@pytest.mark.parametrize("name,kw,size", PER_FAMILY, ids=PER_FAMILY_IDS)
def test_head_reinit_for_another_class_count(name, kw, size):
    sd = _state_dict(_perturbed_timm_model(name, size, **kw))
    head_key = HEAD_KEYS[name]
    with pytest.raises(ConversionError) as error:
        timm_to_flax(name, sd, num_classes=5, **kw)
    assert head_key in str(error.value)
    assert head_key.replace("weight", "bias") in str(error.value)

    reinit = flat(timm_to_flax(name, sd, num_classes=5, reinit_head=True, **kw))
    same = flat(timm_to_flax(name, sd, **kw))
    assert reinit[("params", "head", "kernel")].shape[-1] == 5
    assert reinit[("params", "head", "bias")].shape == (5,)
    for path, value in same.items():
        if path[1] != "head":
            np.testing.assert_array_equal(reinit[path], value)
    # The fresh head is the model's own initialisation, not zeros.
    assert np.std(reinit[("params", "head", "kernel")]) > 0


@pytest.mark.parametrize("name,kw,size", PER_FAMILY, ids=PER_FAMILY_IDS)
def test_missing_and_unexpected_keys_are_listed(name, kw, size):
    sd = _state_dict(_perturbed_timm_model(name, size, **kw))
    dropped = sorted(k for k in sd if "bias" in k and k != HEAD_KEYS[name])[0]
    with pytest.raises(ConversionError, match="no checkpoint key") as error:
        timm_to_flax(name, {k: v for k, v in sd.items() if k != dropped}, **kw)
    assert dropped in str(error.value)
    with pytest.raises(ConversionError, match="does not use") as error:
        timm_to_flax(name, {**sd, "extra.weight": np.zeros(3, np.float32)}, **kw)
    assert "extra.weight" in str(error.value)
    wrong_shape = {**sd, dropped: np.zeros(sd[dropped].shape[0] + 1, np.float32)}
    with pytest.raises(ConversionError, match="shape mismatches") as error:
        timm_to_flax(name, wrong_shape, **kw)
    assert dropped in str(error.value)


@pytest.mark.parametrize("name,kw,size", PER_FAMILY, ids=PER_FAMILY_IDS)
def test_pre_stage_hook(name, kw, size):
    model = create_model(name, num_classes=NUM_CLASSES, **kw)
    _, images = _random_images(size, 2)
    variables = _random_variables(model, images)
    logits, features = model.apply(variables, images)
    seen = []

    def identity(index, x):
        seen.append((index, x))
        return x

    same_logits, _ = model.apply(variables, images, pre_stage=identity)
    np.testing.assert_array_equal(same_logits, logits)
    assert [index for index, _ in seen] == [0, 1, 2, 3]
    for (_, stage_input), previous_output in zip(seen[1:], features["stages"][:3]):
        np.testing.assert_array_equal(stage_input, previous_output)

    def add_at_stage_two(index, x):
        # A per-channel offset: a constant one would vanish in ConvNeXt's LayerNorm.
        return x + jnp.linspace(0.0, 1.0, x.shape[-1]) if index == 2 else x

    shifted_logits, shifted = model.apply(variables, images, pre_stage=add_at_stage_two)
    assert max_diff(shifted_logits, logits) > 1e-3
    for k in range(2):
        np.testing.assert_array_equal(shifted["stages"][k], features["stages"][k])
    for k in range(2, 4):
        assert max_diff(shifted["stages"][k], features["stages"][k]) > 1e-3


def test_train_mode_batch_norm_matches_timm():
    name, kw, size = REDUCED[0]
    model = _perturbed_timm_model(name, size, **kw)
    variables = timm_to_flax(name, _state_dict(model), **kw)
    images_nchw, images = _random_images(size, 4, seed=1)
    model.train()
    with torch.no_grad():
        ref_logits = model(images_nchw).numpy()
    (logits, _), updates = create_model(name, num_classes=NUM_CLASSES, **kw).apply(
        variables, images, train=True, mutable=["batch_stats"])
    assert max_diff(logits, ref_logits) <= 1e-4
    # PyTorch momentum 0.1 == Flax momentum 0.9 for the running mean.
    np.testing.assert_allclose(updates["batch_stats"]["layer2_0"]["bn1"]["mean"],
                               model.layer2[0].bn1.running_mean.numpy(), atol=1e-5)
    # ... and the running variance takes the unbiased batch variance, as PyTorch's.
    for block, torch_block in (("layer2_0", model.layer2[0]), ("layer4_1", model.layer4[1])):
        np.testing.assert_allclose(updates["batch_stats"][block]["bn1"]["var"],
                                   torch_block.bn1.running_var.numpy(), rtol=1e-5)


@pytest.mark.parametrize("name,kw,size", PER_FAMILY, ids=PER_FAMILY_IDS)
def test_drop_path_only_in_training(name, kw, size):
    _, images = _random_images(size, 4)
    plain = create_model(name, num_classes=NUM_CLASSES, **kw)
    dropping = create_model(name, num_classes=NUM_CLASSES, drop_path_rate=0.5, **kw)
    variables = _random_variables(plain, images)

    def run(model, train, seed=0):
        return model.apply(variables, images, train=train, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.PRNGKey(seed)})[0][0]

    np.testing.assert_array_equal(run(dropping, False), run(plain, False))
    assert max_diff(run(dropping, True), run(plain, True)) > 1e-3
    assert max_diff(run(dropping, True, 0), run(dropping, True, 1)) > 1e-3
    np.testing.assert_array_equal(run(dropping, True, 2), run(dropping, True, 2))


def test_bfloat16_compute_keeps_float32_params():
    name, kw, size = REDUCED[0]
    _, images = _random_images(size, 2)
    model32 = create_model(name, num_classes=NUM_CLASSES, **kw)
    model16 = create_model(name, num_classes=NUM_CLASSES, dtype=jnp.bfloat16, **kw)
    variables = _random_variables(model32, images)
    shapes = jax.eval_shape(model16.init, jax.random.PRNGKey(0), images)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes))
    logits16, _ = model16.apply(variables, images)
    logits32, _ = model32.apply(variables, images)
    assert logits16.dtype == jnp.bfloat16
    scale = float(np.max(np.abs(logits32)))
    assert max_diff(logits16, logits32) <= 0.05 * scale
