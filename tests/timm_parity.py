"""Checks shared by the model-family tests: a perturbed timm (or other PyTorch) model vs its
converted Flax twin."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxkd.convert.core import (ConversionError, abstract_variables, converter_for, flax_to_timm,
                                timm_to_flax)
from jaxkd.models import create_model, model_info

PARITY_TOLERANCE = 1e-4


def perturbed(model, seed=0):
    """The timm model in eval mode with every parameter moved off its (partly zero) init, and
    every BatchNorm's running statistics off their 0/1 start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
        for norm in model.modules():
            if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
                norm.running_mean.add_(0.1 * torch.randn(norm.running_mean.shape,
                                                         generator=generator))
                norm.running_var.mul_(0.5 + 1.5 * torch.rand(norm.running_var.shape,
                                                             generator=generator))
    return model.eval()


def randomise_parameters_and_statistics(model, size):
    """Every parameter and BN statistic of a PyTorch model random (no zero/one inits), drawn
    from torch's global generator; returns the model in eval mode.

    BN statistics are first measured on a random batch, so activations keep a sane scale through
    deep nets, then perturbed so each channel's mean/var is distinct from the batch's.
    """
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, (p[0].numel()) ** -0.5)
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # norm scales and ConvNeXt's layer scale gamma
                p.uniform_(0.5, 1.5)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms:
            m.momentum = None  # cumulative average: running stats = this batch's stats
            m.reset_running_stats()
        model.train()
        model(torch.randn(4, 3, size, size))
        for m in norms:
            m.momentum = 0.1
            m.running_mean.add_(0.1 * torch.randn_like(m.running_mean) * m.running_var.sqrt())
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.5, 2.0))
    return model.eval()


def timm_outputs(model, images, stage_modules, nchw_stages=False):
    """(logits, pre-logits embedding, stage outputs) of a timm model, via forward hooks.

    `nchw_stages`: the stage modules output NCHW maps (CNNs), returned as NHWC like Flax's.
    """
    stages = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: stages.append(out.detach()))
             for m in stage_modules]
    try:
        with torch.no_grad():
            features = model.forward_features(images)
            embedding = model.forward_head(features, pre_logits=True).numpy()
            logits = model.forward_head(features).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    if nchw_stages:
        stages = [stage.permute(0, 2, 3, 1) for stage in stages]
    return logits, embedding, [stage.numpy() for stage in stages]


def random_images(size, batch=2, seed=1):
    """The same random batch as NCHW torch and NHWC numpy."""
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images, images.permute(0, 2, 3, 1).numpy()


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def absolute_tolerance(reference):
    """PARITY_TOLERANCE whatever the scale: what LayerNorm-ed transformer features keep."""
    return PARITY_TOLERANCE


def scaled_tolerance(reference):
    """PARITY_TOLERANCE, relative to the map's scale once that exceeds 1.

    Un-normalised stage maps of deep float32 nets drift further than logits: on full-size
    ResNet-50 timm's own float32 stage-3 map is 3e-4 from its float64 twin (values ~10).
    """
    return PARITY_TOLERANCE * max(1.0, float(np.max(np.abs(reference))))


def assert_close(actual, expected, what, tolerance=PARITY_TOLERANCE):
    actual = np.asarray(actual, dtype=np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = max_diff(actual, expected)
    assert diff <= tolerance, f"{what}: max abs diff {diff} > {tolerance}"


def run_both(name, torch_model, kw, stage_modules, size, batch=2):
    """The timm model and its converted (jitted) Flax twin, run on the same images."""
    images_nchw, images = random_images(size, batch)
    expected = timm_outputs(torch_model, images_nchw, stage_modules)
    variables = timm_to_flax(name, torch_model.state_dict(), **kw)
    model = create_model(name, num_classes=expected[0].shape[1], **kw)
    logits, features = jax.jit(model.apply)(variables, images)
    return dict(name=name, torch_model=torch_model, model=model, variables=variables,
                images=images, logits=logits, features=features, expected=expected)


def assert_parity(run, feature_tolerance=absolute_tolerance):
    """Logits within PARITY_TOLERANCE; embedding and every expected stage (4 for timm models)
    within feature_tolerance."""
    logits, embedding, stages = run["expected"]
    assert_close(run["logits"], logits, "logits")
    assert_close(run["features"]["embedding"], embedding, "embedding",
                 feature_tolerance(embedding))
    assert len(run["features"]["stages"]) == len(stages)
    for i, (ours, theirs) in enumerate(zip(run["features"]["stages"], stages)):
        assert_close(ours, theirs, f"stage {i}", feature_tolerance(theirs))
    # The perturbation must make the comparison meaningful (not ~zero logits).
    assert np.abs(logits).max() > 0.1


def flat(tree):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def parameter_count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def assert_registered_like_timm(name, family, converter, pretrained_cfg, torch_model):
    """Registry entry carries timm's preprocessing, the model its family's converter; the Flax
    model has timm's parameter count."""
    info = model_info(name)
    assert info.family == family and converter_for(name).name == converter
    assert info.mean == tuple(pretrained_cfg["mean"])
    assert info.std == tuple(pretrained_cfg["std"])
    assert info.input_size == pretrained_cfg["input_size"][-1]
    expected = sum(p.numel() for p in torch_model.parameters())
    shapes = abstract_variables(name, 1000)
    assert set(shapes) == {"params"}
    assert parameter_count(shapes) == expected


def assert_round_trip(run, kw, fresh_timm_model):
    """Flax -> timm (strict load, same logits) -> Flax gives back every array exactly.

    Returns the exported state dict.
    """
    name, variables = run["name"], run["variables"]
    state_dict = flax_to_timm(name, variables)
    fresh_timm_model.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()},
                                     strict=True)
    with torch.no_grad():
        expected = fresh_timm_model(torch.from_numpy(run["images"]).permute(0, 3, 1, 2)).numpy()
    assert_close(run["logits"], expected, "logits of the exported model")
    back = flat(timm_to_flax(name, fresh_timm_model.state_dict(), **kw))
    original = flat(variables)
    assert back.keys() == original.keys()
    for path, value in original.items():
        np.testing.assert_array_equal(back[path], value, err_msg="/".join(path))
    return state_dict


def assert_head_reinit(run, kw, head_key, head_kernel_shape):
    """Another class count: a clear error naming the head, or a fresh head with reinit_head."""
    name, state_dict = run["name"], run["torch_model"].state_dict()
    with pytest.raises(ConversionError, match=head_key) as error:
        timm_to_flax(name, state_dict, num_classes=5, **kw)
    bias_key = head_key.replace("weight", "bias")
    assert bias_key in str(error.value) and "reinit_head=True" in str(error.value)
    variables = flat(timm_to_flax(name, state_dict, num_classes=5, reinit_head=True, **kw))
    assert variables[("params", "head", "kernel")].shape == head_kernel_shape
    same = flat(run["variables"])
    assert variables.keys() == same.keys()
    for path, value in variables.items():
        if path[1] != "head":
            np.testing.assert_array_equal(value, same[path])


def assert_keys_listed(run, kw, dropped, extra, mapping_line):
    """A dropped key is listed with the Flax path it feeds; an unknown key is listed too."""
    state_dict = dict(run["torch_model"].state_dict())
    del state_dict[dropped]
    state_dict[extra] = torch.zeros(3)
    with pytest.raises(ConversionError) as error:
        timm_to_flax(run["name"], state_dict, **kw)
    message = str(error.value)
    assert mapping_line in message
    assert extra in message


def apply_recording_stage_inputs(model, variables, images, compile=True):
    """Apply (jitted unless `compile=False`) with an identity `pre_stage` that returns what it
    was given."""
    def record_all(variables, images):
        seen = []

        def record(index, x):
            seen.append((index, x))
            return x

        return model.apply(variables, images, pre_stage=record), seen

    return (jax.jit(record_all) if compile else record_all)(variables, images)


def assert_pre_stage_hook_placement(run, first_input_shape, compile=True, *,
                                    after_downsampling=False):
    """Stage k's input is stage k-1's output (with `after_downsampling`: the input of stage
    k's first block, after its downsampling, shaped like stage k's output); changing stage 2's
    input changes stage 2 and every later one, and the logits. The run's outputs must come
    from the same mode: with `compile=False` everything runs op by op, where the identity hook
    is bit-exact whatever XLA would fuse around the values it records."""
    model, variables, images = run["model"], run["variables"], run["images"]
    logits, features = run["logits"], run["features"]
    num_stages = len(features["stages"])
    (same_logits, _), seen = apply_recording_stage_inputs(model, variables, images, compile)
    np.testing.assert_array_equal(same_logits, logits)
    assert [i for i, _ in seen] == list(range(num_stages))
    assert seen[0][1].shape == first_input_shape
    for index in range(1, num_stages):
        if after_downsampling:
            assert seen[index][1].shape == features["stages"][index].shape
        else:
            np.testing.assert_array_equal(seen[index][1], features["stages"][index - 1])

    def add_to_stage_2(index, x):  # not constant over channels, which LayerNorm would undo
        return x + jnp.linspace(0.0, 1.0, x.shape[-1]) if index == 2 else x

    shifted_apply = lambda v, x: model.apply(v, x, pre_stage=add_to_stage_2)  # noqa: E731
    shifted_logits, shifted = (jax.jit(shifted_apply) if compile else shifted_apply)(
        variables, images)
    for index in (0, 1):
        np.testing.assert_array_equal(shifted["stages"][index], features["stages"][index])
    for index in range(2, num_stages):
        assert not np.allclose(shifted["stages"][index], features["stages"][index])
    assert not np.allclose(shifted_logits, logits)


def assert_drop_path_random_in_training(model, run):
    """Training with drop path differs per dropout key and from the eval logits."""
    variables, images = run["variables"], run["images"]
    train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key})[0])
    first = train(variables, images, jax.random.PRNGKey(1))
    assert not np.allclose(first, train(variables, images, jax.random.PRNGKey(2)))
    assert not np.allclose(first, run["logits"])


def assert_drop_path_only_in_training(run, kw):
    """With drop_path_rate=0.5: eval logits unchanged, training logits random."""
    model = create_model(run["name"], num_classes=10, drop_path_rate=0.5, **kw)
    eval_logits = jax.jit(model.apply)(run["variables"], run["images"])[0]
    np.testing.assert_array_equal(eval_logits, run["logits"])
    assert_drop_path_random_in_training(model, run)


def assert_bfloat16_compute_keeps_float32_params(run, kw):
    model = create_model(run["name"], num_classes=10, dtype=jnp.bfloat16, **kw)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), run["images"])))
    logits = jax.jit(model.apply)(run["variables"], run["images"])[0]
    assert logits.dtype == jnp.bfloat16
    expected = run["logits"]
    scale = float(np.abs(expected).max())
    assert max_diff(logits, expected) < 0.05 * scale
