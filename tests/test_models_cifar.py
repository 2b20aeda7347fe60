"""CRD's 32 px CIFAR models (RepDistiller's resnet/wrn/vgg) against PyTorch twins written here
from the architecture: parity of logits and every feature, parameter counts, and conversion
both ways through the `{'model': state_dict}` files the code base publishes its teachers as."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxkd.checkpoint import load_model
from jaxkd.convert import ConversionError, flax_to_timm, read_state_dict, timm_to_flax
from jaxkd.convert.core import abstract_variables
from jaxkd.errors import ConfigError
from jaxkd.models import create_model, model_info

from cifar_twins import NUM_CLASSES, TWINS, random_images, randomised_twin
from helpers import load_script
from timm_parity import (assert_close, assert_pre_stage_hook_placement, flat, max_diff,
                         parameter_count, scaled_tolerance)

# name -> (parameters at 100 classes, as measured on the PyTorch twin; stage shapes at 32 px).
EXPECTED = {
    "resnet20": (278_324, [(32, 32, 16), (16, 16, 32), (8, 8, 64)]),
    "resnet56": (861_620, [(32, 32, 16), (16, 16, 32), (8, 8, 64)]),
    "resnet110": (1_736_564, [(32, 32, 16), (16, 16, 32), (8, 8, 64)]),
    "resnet8x4": (1_233_540, [(32, 32, 64), (16, 16, 128), (8, 8, 256)]),
    "resnet32x4": (7_433_860, [(32, 32, 64), (16, 16, 128), (8, 8, 256)]),
    "wrn_40_2": (2_255_156, [(32, 32, 32), (16, 16, 64), (8, 8, 128)]),
    "wrn_16_2": (703_284, [(32, 32, 32), (16, 16, 64), (8, 8, 128)]),
    "vgg8": (3_965_028, [(16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)]),
    "vgg13": (9_462_180, [(16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)]),
}
NAMES = list(EXPECTED)
HEAD_KEYS = {"resnet8x4": "fc.weight", "wrn_16_2": "fc.weight", "vgg8": "classifier.weight"}


def _published_checkpoint(path, model):
    """A teacher file as RepDistiller's train_teacher.py saves it: the weights under 'model'
    beside the epoch, best accuracy and optimiser state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.save({"epoch": 240, "model": model.state_dict(), "best_acc": torch.tensor(75.61),
                "optimizer": optimizer.state_dict()}, path)
    return str(path)


def _assert_matches_twin(name, variables, twin, size, batch=2):
    """Logits within 1e-4, the pooled embedding and every stage (RepDistiller's feature list
    without the stem and the pooled vector) within 1e-4 relative to their scale."""
    images_nchw, images = random_images(size, batch)
    with torch.no_grad():
        feats, expected = twin(images_nchw)
    logits, features = create_model(name, num_classes=NUM_CLASSES).apply(variables, images)
    assert np.abs(expected.numpy()).max() > 0.1, "degenerate reference: logits carry no signal"
    assert_close(logits, expected.numpy(), "logits")
    embedding = feats[-1].numpy()
    assert_close(features["embedding"], embedding, "embedding", scaled_tolerance(embedding))
    stages = [f.permute(0, 2, 3, 1).numpy() for f in feats[1:-1]]
    assert len(features["stages"]) == len(stages)
    for i, (ours, theirs) in enumerate(zip(features["stages"], stages)):
        assert_close(ours, theirs, f"stage {i + 1}", scaled_tolerance(theirs))
    return logits, features


# ----------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_and_parameter_count(name):
    expected_count, _ = EXPECTED[name]
    info = model_info(name)
    assert (info.family, info.input_size) == ("cnn", 32)
    assert info.mean == (0.5071, 0.4865, 0.4409) and info.std == (0.2673, 0.2564, 0.2762)
    twin = TWINS[name](NUM_CLASSES)
    assert sum(p.numel() for p in twin.parameters()) == expected_count
    shapes = abstract_variables(name, NUM_CLASSES)
    assert parameter_count(shapes["params"]) == expected_count
    # Every BN's running mean and variance, and nothing else, is a batch statistic.
    buffers = sum(b.numel() for k, b in twin.state_dict().items()
                  if k.endswith(("running_mean", "running_var")))
    assert parameter_count(shapes["batch_stats"]) == buffers


def test_stage_and_embedding_shapes():
    for name, (_, stage_shapes) in EXPECTED.items():
        model = create_model(name, num_classes=NUM_CLASSES)
        _, features = jax.eval_shape(lambda x, m=model: m.init_with_output(
            jax.random.PRNGKey(0), x)[0], jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
        assert [s.shape[1:] for s in features["stages"]] == stage_shapes, name
        assert features["embedding"].shape == (2, stage_shapes[-1][-1]), name


@pytest.mark.parametrize("name", NAMES)
def test_parity_and_conversion_both_ways(tmp_path, name):
    """A published-style file -> Flax matches the twin; Flax -> a state dict the twin loads
    strictly, bit for bit, and back."""
    twin = randomised_twin(name)
    state_dict = read_state_dict(_published_checkpoint(tmp_path / "ckpt_epoch_240.pth", twin))
    variables = timm_to_flax(name, state_dict)  # 100 classes, read from the checkpoint
    logits, _ = _assert_matches_twin(name, variables, twin, 32)

    exported = flax_to_timm(name, variables)
    fresh = TWINS[name](NUM_CLASSES)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for key, value in twin.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(),
                                          err_msg=key)
    back = flat(timm_to_flax(name, exported))
    assert back.keys() == flat(variables).keys()
    for path, value in flat(variables).items():
        np.testing.assert_array_equal(back[path], value, err_msg="/".join(path))
    with torch.no_grad():
        np.testing.assert_array_equal(fresh.eval()(random_images(32)[0])[1].numpy(),
                                      twin(random_images(32)[0])[1].numpy())
    assert logits.shape == (2, NUM_CLASSES)


def test_vgg_pools_before_its_last_block_only_at_64px():
    twin = randomised_twin("vgg8", size=64)
    variables = timm_to_flax("vgg8", twin.state_dict())
    _, features = _assert_matches_twin("vgg8", variables, twin, 64)
    assert [s.shape[1] for s in features["stages"]] == [32, 16, 8, 4]


def test_train_mode_batch_norm_matches_pytorch():
    twin = randomised_twin("wrn_16_2")
    variables = timm_to_flax("wrn_16_2", twin.state_dict())
    images_nchw, images = random_images(32, batch=4)
    twin.train()
    with torch.no_grad():
        _, expected = twin(images_nchw)
    (logits, _), updates = create_model("wrn_16_2", num_classes=NUM_CLASSES).apply(
        variables, images, train=True, mutable=["batch_stats"])
    assert max_diff(logits, expected.numpy()) <= 1e-4
    # PyTorch momentum 0.1 == Flax momentum 0.9 for the running mean.
    np.testing.assert_allclose(updates["batch_stats"]["block2_0"]["bn1"]["mean"],
                               twin.block2.layer[0].bn1.running_mean.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", list(HEAD_KEYS))
def test_missing_unexpected_and_mis_shaped_keys_are_listed(name):
    state_dict = {k: v.numpy() for k, v in randomised_twin(name).state_dict().items()}
    head = HEAD_KEYS[name]
    dropped = sorted(k for k in state_dict if k.endswith("running_var"))[-1]
    with pytest.raises(ConversionError, match="no checkpoint key") as error:
        timm_to_flax(name, {k: v for k, v in state_dict.items() if k != dropped})
    assert dropped in str(error.value)
    with pytest.raises(ConversionError, match="does not use") as error:
        timm_to_flax(name, {**state_dict, "extra.weight": np.zeros(3, np.float32)})
    assert "extra.weight" in str(error.value)
    with pytest.raises(ConversionError, match="shape mismatches") as error:
        timm_to_flax(name, state_dict, num_classes=10)
    assert head in str(error.value) and head.replace("weight", "bias") in str(error.value)
    without_head = {k: v for k, v in state_dict.items() if not k.startswith(head[:-7])}
    with pytest.raises(ConversionError, match=f"has no '{head}'"):
        timm_to_flax(name, without_head)


def test_head_reinit_for_another_class_count():
    state_dict = randomised_twin("vgg8").state_dict()
    same = flat(timm_to_flax("vgg8", state_dict))
    reinit = flat(timm_to_flax("vgg8", state_dict, num_classes=10, reinit_head=True))
    assert reinit[("params", "head", "kernel")].shape == (512, 10)
    assert np.std(reinit[("params", "head", "kernel")]) > 0
    for path, value in same.items():
        if path[1] != "head":
            np.testing.assert_array_equal(reinit[path], value)


@pytest.mark.parametrize("name,first_input", [("resnet8x4", (2, 32, 32, 32)),
                                               ("vgg8", (2, 32, 32, 64))])
def test_pre_stage_hook(name, first_input):
    """Stage k's input is stage k-1's output; VGG's hook sees a block's output before the
    max-pool that opens the next stage. Op by op: cheaper than compiling three programs."""
    variables = timm_to_flax(name, randomised_twin(name).state_dict())
    model = create_model(name, num_classes=NUM_CLASSES)
    images = random_images(32)[1]
    logits, features = model.apply(variables, images)
    assert_pre_stage_hook_placement(dict(model=model, variables=variables, images=images,
                                         logits=logits, features=features), first_input,
                                    compile=False)


def test_bfloat16_compute_keeps_float32_params():
    variables = timm_to_flax("resnet8x4", randomised_twin("resnet8x4").state_dict())
    images = random_images(32)[1]
    model16 = create_model("resnet8x4", num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(
        jax.eval_shape(model16.init, jax.random.PRNGKey(0), images)))
    logits16 = jax.jit(model16.apply)(variables, images)[0]
    logits32 = create_model("resnet8x4", num_classes=NUM_CLASSES).apply(variables, images)[0]
    assert logits16.dtype == jnp.bfloat16
    assert max_diff(logits16, logits32) < 0.05 * float(np.abs(logits32).max())


def test_depth_overrides():
    assert parameter_count(abstract_variables("resnet56", 10, depth=8)["params"]) == \
        sum(p.numel() for p in TWINS["resnet56"](10, depth=8).parameters())
    assert parameter_count(abstract_variables("wrn_40_2", 10, depth=10, widen_factor=1)[
        "params"]) == sum(p.numel() for p in TWINS["wrn_40_2"](10, depth=10,
                                                                widen_factor=1).parameters())
    for name, bad in (("resnet20", {"depth": 21}), ("resnet8x4", {"depth": 2}),
                      ("wrn_16_2", {"depth": 17}), ("wrn_16_2", {"widen_factor": 0})):
        with pytest.raises(ConfigError, match="depth"):
            create_model(name, **bad)
    with pytest.raises(ConfigError, match="bad overrides"):
        create_model("vgg8", depth=11)


def test_convert_and_export_scripts_on_a_repdistiller_teacher(tmp_path, capsys):
    """scripts/convert_timm.py makes a teacher export from a published-style file (a model
    timm lacks: no timm check); scripts/export_timm.py writes tensors the twin loads strictly.
    `--num-classes --reinit-head` and a checkpoint of another model are handled too."""
    convert, export = load_script("convert_timm"), load_script("export_timm")
    twin = randomised_twin("vgg13")
    source = _published_checkpoint(tmp_path / "vgg13_best.pth", twin)
    teacher = str(tmp_path / "teacher")
    assert convert.main(["--model", "vgg13", "--checkpoint", source, "--out", teacher]) == 0
    out = capsys.readouterr().out
    assert "9,462,180 parameters, 100 classes" in out and "parity check skipped" in out
    assert "checkpoint layout: original" in out  # RepDistiller's own keys, not timm's model
    variables, meta = load_model(teacher)
    assert (meta["model_name"], meta["num_classes"]) == ("vgg13", 100)
    np.testing.assert_array_equal(variables["params"]["block3_conv1"]["kernel"],
                                  twin.block3[3].weight.detach().numpy().transpose(2, 3, 1, 0))

    exported = str(tmp_path / "vgg13.safetensors")
    assert export.main(["--checkpoint", teacher, "--out", exported]) == 0
    assert "strict-load check skipped" in capsys.readouterr().out
    fresh = TWINS["vgg13"](NUM_CLASSES)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in read_state_dict(exported).items()},
                          strict=True)
    for key, value in twin.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy())

    assert convert.main(["--model", "vgg13", "--checkpoint", source, "--out",
                         str(tmp_path / "ten"), "--num-classes", "10", "--reinit-head"]) == 0
    assert load_model(str(tmp_path / "ten"))[1]["num_classes"] == 10
    assert convert.main(["--model", "vgg8", "--checkpoint", source, "--out",
                         str(tmp_path / "wrong")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "block0.3.weight" in err and "Traceback" not in err
