"""End-to-end runs of train_and_evaluate on the embedded digits and on mock CIFAR-100."""

import itertools
import json
import os

import jax
import numpy as np
import pytest

from jaxkd import distill, sharding, step, train
from jaxkd.errors import CheckpointError, ConfigError
from jaxkd.metric_writer import read_metrics

from helpers import TINY_VIT, VIT, random_teacher, tiny_config


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return random_teacher(str(tmp_path_factory.mktemp("teacher")), num_classes=10)


def _train_losses(workdir):
    return [m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m]


@pytest.mark.parametrize("method", ["ce", "kd", "rsd"])
def test_one_method_end_to_end(tmp_path, digits_dir, teacher_dir, method):
    config = tiny_config(method, data_dir=digits_dir, teacher_checkpoint=teacher_dir, steps=3)
    result = train.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= result["eval/top1"] <= 100.0
    assert result["eval/top1"] <= result["eval/top5"]
    metrics = read_metrics(str(tmp_path))
    steps = [m["step"] for m in metrics if "train/loss" in m]
    assert steps == [1, 2, 3]
    assert all(np.isfinite(_train_losses(str(tmp_path))))
    if method != "ce":  # the teacher is evaluated once, before training
        assert any("eval/teacher_top1" in m for m in metrics)
    if method == "rsd":
        assert all("train/rsd" in m for m in metrics if "train/loss" in m)
    # The export is a student model that loads back as a teacher would.
    config2 = tiny_config("kd", data_dir=digits_dir,
                          teacher_checkpoint=os.path.join(tmp_path, "export"), steps=1)
    train.train_and_evaluate(config2, str(tmp_path / "from_export"))
    assert os.path.exists(tmp_path / "tensorboard")


def test_teacher_gets_no_gradient_and_stays_fixed(tmp_path, digits_dir, teacher_dir):
    config = tiny_config("rsd", data_dir=digits_dir, teacher_checkpoint=teacher_dir)
    mesh = sharding.data_mesh()
    setup, teacher_variables = step.build(config, 10, 10, 10, mesh)
    state = step.init_state(setup, 0)
    images = np.random.RandomState(0).rand(16, 16, 16, 3).astype(np.float32)
    batch = sharding.global_batch({"image": images, "label": np.arange(16, dtype=np.int32) % 10,
                                   "index": np.arange(16, dtype=np.int32)}, mesh)

    def loss_wrt_teacher(teacher_variables):
        teacher = step.teacher_view(setup, teacher_variables, batch["image"])
        student = setup.student.module.apply(
            {"params": state.params["student"]}, setup.student.normalize(batch["image"]))
        terms, _ = setup.method.apply(
            {"params": state.params["method"], **state.model_state["method"]},
            distill.Outputs(*student), teacher, batch, train=True, mutable=["batch_stats"])
        return distill.total_loss(terms)[0]

    grads = jax.grad(loss_wrt_teacher)(teacher_variables)
    assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    before = jax.tree.map(np.array, teacher_variables)
    state, metrics = step.jit_train_step(setup)(state, teacher_variables, batch)
    assert np.isfinite(float(metrics["train/loss"]))
    jax.tree.map(np.testing.assert_array_equal, before,
                 jax.tree.map(np.array, teacher_variables))


def _mesh(n):
    return sharding.Mesh(np.asarray(jax.devices()[:n]), (sharding.DATA_AXIS,))


def test_one_device_and_eight_devices_give_the_same_losses(tmp_path, digits_dir, teacher_dir,
                                                           monkeypatch):
    config = tiny_config("kd", data_dir=digits_dir, teacher_checkpoint=teacher_dir, steps=4)
    config.optimizer.update(name="sgd", lr=0.05)
    losses = {}
    for n in (1, 8):
        monkeypatch.setattr(sharding, "data_mesh", lambda n=n: _mesh(n))
        train.train_and_evaluate(config, str(tmp_path / str(n)))
        losses[n] = _train_losses(str(tmp_path / str(n)))
    assert len(losses[1]) == 4
    np.testing.assert_allclose(losses[1], losses[8], rtol=2e-5)


def test_rsd_grouped_statistics_do_not_depend_on_the_device_count(digits_dir, teacher_dir):
    # Two fixed groups of 8: the same loss and gradient on 1 and on 8 devices. (With random
    # models RSD is ill-conditioned, so only the first step is compared tightly.)
    config = tiny_config("rsd", data_dir=digits_dir, teacher_checkpoint=teacher_dir,
                         stats_groups=2)
    rng = np.random.RandomState(0)
    batch = {"image": rng.rand(16, 16, 16, 3).astype(np.float32),
             "label": rng.randint(0, 10, 16).astype(np.int32),
             "index": np.arange(16, dtype=np.int32)}
    metrics = {}
    for n in (1, 8):
        setup, teacher_variables = step.build(config, 10, 4, 4, _mesh(n))
        state = step.init_state(setup, 0)
        _, metrics[n] = step.jit_train_step(setup)(state, teacher_variables,
                                                   sharding.global_batch(batch, _mesh(n)))
    for key in ("train/loss", "train/rsd", "train/grad_norm"):
        np.testing.assert_allclose(metrics[1][key], metrics[8][key], rtol=2e-5, err_msg=key)


def test_resume_continues_from_checkpoint(tmp_path, digits_dir, monkeypatch):
    config = tiny_config("ce", data_dir=digits_dir, steps=4)
    config.checkpoint_every_steps = 2
    train.train_and_evaluate(config, str(tmp_path / "straight"))

    class Interrupted(Exception):
        pass

    real_batches = train.data.RandomSampler.batches

    def interrupted_after_three(*args, **kwargs):
        yield from itertools.islice(real_batches(*args, **kwargs), 3)
        raise Interrupted

    monkeypatch.setattr(train.data.RandomSampler, "batches", interrupted_after_three)
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(train.data.RandomSampler, "batches", real_batches)
    train.train_and_evaluate(config, str(tmp_path / "resumed"))  # resumes from step 2
    steps = [m["step"] for m in read_metrics(str(tmp_path / "resumed")) if "train/loss" in m]
    assert steps == [1, 2, 3, 3, 4]  # step 3 was lost with the crash and done again
    resumed = {m["step"]: m["train/loss"] for m in read_metrics(str(tmp_path / "resumed"))
               if "train/loss" in m}
    # Same batches (the pipeline skips to the resumed step), same updates.
    np.testing.assert_allclose([resumed[s] for s in (1, 2, 3, 4)],
                               _train_losses(str(tmp_path / "straight")), rtol=1e-5)


def test_resume_with_another_config_is_refused(tmp_path, digits_dir, teacher_dir):
    train.train_and_evaluate(tiny_config("ce", data_dir=digits_dir, steps=1), str(tmp_path))
    other = tiny_config("kd", data_dir=digits_dir, teacher_checkpoint=teacher_dir, steps=2)
    with pytest.raises(CheckpointError, match="method: checkpoint has 'ce', config has 'kd'"):
        train.train_and_evaluate(other, str(tmp_path))


def test_mock_cifar100_end_to_end(tmp_path, mock_cifar):
    config = tiny_config("rsd", dataset="cifar100", data_dir=mock_cifar,
                         teacher_checkpoint=random_teacher(str(tmp_path / "t"), 100), steps=2)
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert 0.0 <= result["eval/top1"] <= 100.0
    with open(tmp_path / "run" / "export" / "model.json") as f:
        assert json.load(f)["num_classes"] == 100


def test_teacher_checkpoint_of_another_model_is_refused(tmp_path, digits_dir):
    wrong = random_teacher(str(tmp_path / "t"), 10, overrides={**TINY_VIT, "embed_dim": 48})
    config = tiny_config("kd", data_dir=digits_dir, teacher_checkpoint=wrong)
    with pytest.raises(CheckpointError, match="embed_dim"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path, digits_dir):
    config = tiny_config("kd", data_dir=digits_dir, teacher_checkpoint=str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="does not exist"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    config = tiny_config("kd", data_dir=digits_dir)
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        train.train_and_evaluate(config, str(tmp_path / "run2"))


def test_batch_not_divisible_by_devices(tmp_path, digits_dir):
    config = tiny_config("ce", data_dir=digits_dir, batch_size=12)
    with pytest.raises(ConfigError, match="not divisible by the 8 devices"):
        train.train_and_evaluate(config, str(tmp_path))


def test_unknown_student_lists_models(tmp_path, digits_dir):
    config = tiny_config("ce", data_dir=digits_dir)
    config.student.name = "resnet19"
    with pytest.raises(ConfigError, match="unknown model 'resnet19'.*resnet18"):
        train.train_and_evaluate(config, str(tmp_path))


def test_schedules_follow_the_recipe():
    import ml_collections

    from jaxkd import optim

    cfg = ml_collections.ConfigDict({"name": "sgd", "lr": 0.1, "schedule": "step",
                                     "warmup_epochs": 1, "decay_epochs": (3, 6),
                                     "decay_factor": 0.1})
    _, schedule = optim.build_optimizer(cfg, total_steps=100, steps_per_epoch=10)
    np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 29, 30, 59, 60, 99)],
                               [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    cfg.update(schedule="cosine", end_lr=0.001, decay_epochs=())
    _, schedule = optim.build_optimizer(cfg, total_steps=110, steps_per_epoch=10)
    np.testing.assert_allclose([schedule(10), schedule(60), schedule(110)],
                               [0.1, 0.001 + 0.5 * 0.099, 0.001], rtol=1e-5)


def test_converted_timm_checkpoint_serves_as_teacher(tmp_path, digits_dir):
    """A timm state dict file -> scripts/convert_timm.py -> config.teacher.checkpoint."""
    import importlib.util

    import torch
    from safetensors.torch import save_file

    from jaxkd.convert.timm_import import import_timm

    spec = importlib.util.spec_from_file_location(
        "convert_timm", os.path.join(os.path.dirname(__file__), "..", "scripts",
                                     "convert_timm.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    torch.manual_seed(0)
    timm_teacher = import_timm().create_model("resnet18", pretrained=False, num_classes=10)
    save_file(dict(timm_teacher.state_dict()), str(tmp_path / "teacher.safetensors"))
    assert convert.main(["--model", "resnet18", "--checkpoint",
                         str(tmp_path / "teacher.safetensors"), "--out",
                         str(tmp_path / "teacher")]) == 0

    config = tiny_config("rsd", data_dir=digits_dir, teacher_checkpoint=str(tmp_path / "teacher"),
                         steps=2)
    config.teacher.name, config.teacher.overrides = "resnet18", {}
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert 0.0 <= result["eval/top1"] <= 100.0
    teacher_eval = [m for m in read_metrics(str(tmp_path / "run")) if "eval/teacher_top1" in m]
    assert len(teacher_eval) == 1
    # The converted teacher scores exactly what timm's model scores on the same images.
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    correct = total = 0
    timm_teacher.eval()
    for batch in train.data.open_dataset("sklearn_digits", digits_dir).eval_batches(
            global_batch_size=64, image_size=16):
        images = torch.from_numpy(((batch["image"] - mean) / std).astype(np.float32))
        with torch.no_grad():
            predictions = timm_teacher(images.permute(0, 3, 1, 2)).argmax(-1).numpy()
        correct += int(((predictions == batch["label"]) * batch["mask"]).sum())
        total += int(batch["mask"].sum())
    assert total == 360
    np.testing.assert_allclose(teacher_eval[0]["eval/teacher_top1"], 100.0 * correct / total,
                               rtol=1e-6)


def test_teacher_near_chance_is_reported_and_min_top1_stops_the_run(tmp_path, digits_dir,
                                                                    teacher_dir, caplog):
    # A randomly initialised teacher scores about chance (10%) on the digits.
    config = tiny_config("kd", data_dir=digits_dir, teacher_checkpoint=teacher_dir, steps=1)
    with caplog.at_level("WARNING", logger="jaxkd"):
        result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["eval/teacher_top1"] < 20.0
    assert "TEACHER NEAR CHANCE" in caplog.text and "normalised differently" in caplog.text
    # Every result states what it was distilled from: the export names the teacher.
    with open(tmp_path / "run" / "export" / "model.json") as f:
        meta = json.load(f)
    assert (meta["teacher"], meta["teacher_checkpoint"]) == (VIT, teacher_dir)
    np.testing.assert_allclose(meta["teacher_top1"], result["eval/teacher_top1"])
    config.teacher.min_top1 = 50.0
    with pytest.raises(ConfigError, match="below config.teacher.min_top1 = 50%"):
        train.train_and_evaluate(config, str(tmp_path / "refused"))
