"""Reliability of the trainer: exact resume after SIGKILL, preemption by SIGTERM/SIGINT,
checkpoint integrity, non-finite losses, bad inputs and determinism.

Every resumed run is compared bitwise with one straight run of the same config.
"""

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import TINY_VIT, random_teacher

from jaxkd import checkpoint, distill, run_config, train
from jaxkd.errors import CheckpointError, JaxkdError, NonFiniteLossError, Preempted
from jaxkd.metric_writer import read_metrics

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
STEPS = 6

# The run under test, as a config file so that `python -m jaxkd.main` loads it too. RSD (method
# parameters, batch statistics), drop-path (the step's RNG), EMA and random crops and flips
# (the input pipeline): everything a resume has to restore exactly.
CONFIG_BODY = """
import sys

sys.path.insert(0, TESTS)
from helpers import TINY_VIT, tiny_config


def get_config():
    config = tiny_config("rsd", data_dir=DATA_DIR, teacher_checkpoint=TEACHER, steps=6)
    config.student.overrides = dict(TINY_VIT, drop_path_rate=0.1)
    config.ema_decay = 0.9
    config.eval_every_steps = 3
    config.eval_batch_size = 120  # the 360 test images in 3 batches
    config.checkpoint_every_steps = 2
    return config
"""

# `python -m jaxkd.main`, with each train batch from the SLOW_FROM-th on delayed by DELAY
# seconds, so that a signal arrives while the run is mid-way.
DRIVER = """
import sys
import time

from absl import app

from jaxkd import main, train

slow_from, delay = int(sys.argv.pop(1)), float(sys.argv.pop(1))
real_batches = train.data.RandomSampler.batches


def slow_batches(*args, start_step=0, **kwargs):
    batches = real_batches(*args, start_step=start_step, **kwargs)
    for step, batch in enumerate(batches, start_step + 1):
        if step >= slow_from:
            time.sleep(delay)
        yield batch


train.data.RandomSampler.batches = slow_batches
app.run(main.main)
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    teacher = random_teacher(str(root / "teacher"), num_classes=10)
    path = root / "config.py"
    path.write_text(f"TESTS, DATA_DIR, TEACHER = {TESTS!r}, {str(root / 'tfds')!r}, "
                    f"{teacher!r}\n" + CONFIG_BODY)
    return str(path)


def _config(config_file):
    spec = importlib.util.spec_from_file_location("reliability_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    """The straight run's workdir (read only: tests copy it before changing anything)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    train.train_and_evaluate(_config(config_file), workdir)
    return workdir


def _checkpoint_steps(workdir):
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints"))
                  if name.isdigit())


def _train_steps(workdir):
    return [m["step"] for m in read_metrics(workdir) if "train/loss" in m]


def _final_state_leaves(workdir):
    """Path -> array of the newest train checkpoint, read with Orbax alone."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    manager.close()
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def _metrics_by_step(workdir):
    """{(step, name): value}; a step's record written again after a resume replaces the old."""
    return {(m["step"], k): v for m in read_metrics(workdir) for k, v in m.items() if k != "step"}


def _assert_same_run(workdir, reference, eval_skipped_at=None):
    """Bitwise-equal parameters (export and every array of the final train state) and equal
    metrics; `eval_skipped_at`: a step whose evaluation a preemption skipped."""
    exports = [Path(w, "export", "variables.safetensors").read_bytes()
               for w in (workdir, reference)]
    assert exports[0] == exports[1]
    ours, theirs = _final_state_leaves(workdir), _final_state_leaves(reference)
    assert sorted(ours) == sorted(theirs) and len(ours) > 50
    for path in ours:
        assert ours[path].dtype == theirs[path].dtype, path
        assert ours[path].tobytes() == theirs[path].tobytes(), path
    ours, theirs = _metrics_by_step(workdir), _metrics_by_step(reference)
    if eval_skipped_at is not None:
        theirs = {k: v for k, v in theirs.items()
                  if not (k[0] == eval_skipped_at and k[1].startswith("eval/"))}
    assert ours == theirs
    assert (STEPS, "eval/top1") in ours and (STEPS, "train/loss") in ours


def _subprocess_env():
    """The test process's JAX settings (8 CPU devices, exact matmuls, compilation cache)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def _start_driver(config_file, workdir, log_path, *, slow_from, delay):
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(slow_from), str(delay),
             f"--config={config_file}", f"--workdir={workdir}"],
            cwd=ROOT, env=_subprocess_env(), stdout=log, stderr=subprocess.STDOUT)


def _last_train_step_written(workdir):
    """Like _train_steps(workdir)[-1], reading only the complete lines of a file being written."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = f.read().split("\n")[:-1]
    except FileNotFoundError:
        return 0
    return max([json.loads(line)["step"] for line in lines if "train/loss" in line], default=0)


def _wait_for_train_step(proc, workdir, step, log_path, timeout=300):
    deadline = time.monotonic() + timeout
    while _last_train_step_written(workdir) < step:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run ended or stalled before step {step}:\n" +
                        Path(log_path).read_text()[-3000:])
        time.sleep(0.05)


def test_same_config_and_seed_give_the_same_run(config_file, reference, tmp_path):
    train.train_and_evaluate(_config(config_file), str(tmp_path))
    _assert_same_run(str(tmp_path), reference)


def test_run_killed_by_sigkill_resumes_bitwise_identical(config_file, reference, tmp_path):
    workdir, log_path = str(tmp_path / "run"), str(tmp_path / "log.txt")
    proc = _start_driver(config_file, workdir, log_path, slow_from=6, delay=60)
    _wait_for_train_step(proc, workdir, 5, log_path)  # step 4 is checkpointed, 5 is not
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert _checkpoint_steps(workdir) == [2, 4]

    train.train_and_evaluate(_config(config_file), workdir)
    assert _train_steps(workdir) == [1, 2, 3, 4, 5, 5, 6]  # step 5 was lost and done again
    _assert_same_run(workdir, reference)


def test_sigterm_saves_the_current_step_exits_75_and_resumes(config_file, reference, tmp_path):
    workdir, log_path = str(tmp_path / "run"), str(tmp_path / "log.txt")
    proc = _start_driver(config_file, workdir, log_path, slow_from=3, delay=1.5)
    _wait_for_train_step(proc, workdir, 2, log_path)
    proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=120)
    log = Path(log_path).read_text()
    assert returncode == 75, log[-3000:]
    assert "SIGTERM: finishing the current step" in log and "Traceback" not in log
    stopped = _train_steps(workdir)[-1]
    assert 3 <= stopped < STEPS
    assert f"stopped by SIGTERM after step {stopped}" in log
    assert _checkpoint_steps(workdir)[-1] == stopped

    train.train_and_evaluate(_config(config_file), workdir)
    assert _train_steps(workdir) == list(range(1, STEPS + 1))  # nothing lost, nothing redone
    _assert_same_run(workdir, reference, eval_skipped_at=stopped)


def test_sigint_stops_after_the_current_step(config_file, tmp_path, monkeypatch):
    real_batches = train.data.RandomSampler.batches

    def interrupted_at_third(*args, **kwargs):
        for step, batch in enumerate(real_batches(*args, **kwargs), 1):
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(train.data.RandomSampler, "batches", interrupted_at_third)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Preempted, match="stopped by SIGINT after step 3") as error:
        train.train_and_evaluate(_config(config_file), str(tmp_path))
    assert error.value.exit_code == 75
    assert signal.getsignal(signal.SIGINT) is handler  # the test runner's own again
    assert _train_steps(str(tmp_path)) == [1, 2, 3]
    assert _checkpoint_steps(str(tmp_path)) == [2, 3]


def _array_files(workdir, step):
    """Orbax's data files of a checkpoint's train state, largest first."""
    paths = [os.path.join(root, name)
             for root, _, names in os.walk(os.path.join(workdir, "checkpoints", str(step),
                                                        "state"))
             for name in names if os.path.basename(root) == "d"]
    return sorted(paths, key=os.path.getsize, reverse=True)


def _flip_bytes(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        f.seek(0)
        f.write(data)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(config_file, reference, tmp_path,
                                                              caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    assert _checkpoint_steps(workdir) == [4, 6]
    victim = _array_files(workdir, 6)[0]
    _flip_bytes(victim)
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(_config(config_file), workdir)
    name = os.path.relpath(victim, os.path.join(workdir, "checkpoints", "6"))
    assert f"checkpoint step 6 in {workdir}/checkpoints is corrupt: {name} does not match" \
        in caplog.text
    assert "falling back to the previous good checkpoint, step 4" in caplog.text
    assert os.listdir(os.path.join(workdir, "corrupt_checkpoints")) == ["6"]
    assert _checkpoint_steps(workdir) == [4, 6]  # 6 trained again from 4 and saved anew
    _assert_same_run(workdir, reference)


def test_no_intact_checkpoint_is_a_clear_error(config_file, reference, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    _truncate(_array_files(workdir, 6)[0])
    _flip_bytes(_array_files(workdir, 4)[0])
    with pytest.raises(CheckpointError) as error:
        train.train_and_evaluate(_config(config_file), workdir)
    message = str(error.value)
    assert "no intact checkpoint" in message and "cannot continue" in message
    assert "checkpoint step 6" in message and "(truncated?)" in message
    assert "checkpoint step 4" in message and "does not match its sha256" in message
    assert _checkpoint_steps(workdir) == [4, 6]  # nothing moved: the next try says the same


def test_checkpoint_of_another_configuration_names_what_differs(config_file, tmp_path):
    config = _config(config_file)
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = {"w": np.arange(3, dtype=np.float32)}
    ckpt.save(1, state, run_config.run_metadata(config, 10))
    abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=device)}
    step, restored = ckpt.restore_latest(abstract, run_config.run_metadata(config, 10))
    assert step == 1 and np.array_equal(restored["w"], state["w"])

    other = _config(config_file)
    other.dataset.name = "cifar100"
    other.teacher.overrides = dict(TINY_VIT, embed_dim=48)
    with pytest.raises(CheckpointError) as error:
        ckpt.restore_latest(abstract, run_config.run_metadata(other, 100))
    message = str(error.value)
    assert "dataset: checkpoint has 'sklearn_digits', config has 'cifar100'" in message
    assert "num_classes: checkpoint has 10, config has 100" in message
    assert "teacher_overrides: checkpoint has" in message and "'embed_dim': 48" in message
    # Metadata that matches over a state that does not (say, a changed method setting).
    for changed in ({"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=device)},
                    {"v": abstract["w"]}):
        with pytest.raises(CheckpointError, match="does not fit this config's train state"):
            ckpt.restore_latest(changed, run_config.run_metadata(config, 10))
    ckpt.close()


def _nan_batch_at(step_with_nan):
    real_batches = train.data.RandomSampler.batches

    def batches(*args, start_step=0, **kwargs):
        for step, batch in enumerate(real_batches(*args, start_step=start_step, **kwargs),
                                     start_step + 1):
            if step == step_with_nan:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    return batches


def test_nonfinite_loss_stops_the_run_and_is_never_checkpointed(config_file, tmp_path,
                                                                 monkeypatch):
    config = _config(config_file)
    # No host sync at step 3; step 4 is the first one (a checkpoint step).
    config.log_every_steps, config.eval_every_steps = 5, STEPS
    monkeypatch.setattr(train.data.RandomSampler, "batches", _nan_batch_at(3))
    with pytest.raises(NonFiniteLossError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert "non-finite training loss or gradient at step 3 (loss nan" in message
    assert f"Last good checkpoint: step 2 in {tmp_path}/checkpoints" in message
    assert error.value.exit_code == 3
    assert _checkpoint_steps(str(tmp_path)) == [2]
    assert _train_steps(str(tmp_path)) == []


def test_skip_nonfinite_updates_leaves_the_state_as_it_was(config_file, tmp_path, monkeypatch,
                                                           caplog):
    config = _config(config_file)
    config.skip_nonfinite_updates = True
    config.checkpoint_every_steps = 1  # keeps the states after steps 5 and 6
    monkeypatch.setattr(train.data.RandomSampler, "batches", _nan_batch_at(STEPS))
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config, str(tmp_path))
    assert "skipped 1 update(s) with a non-finite loss or gradient" in caplog.text
    nonfinite = {m["step"]: m["train/nonfinite"] for m in read_metrics(str(tmp_path))
                 if "train/loss" in m}
    assert nonfinite == {**{step: 0.0 for step in range(1, STEPS)}, STEPS: 1.0}
    manager = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"))
    before, after = (manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"] for step in (STEPS - 1, STEPS))
    manager.close()
    assert (int(before["step"]), int(after["step"])) == (STEPS - 1, STEPS)
    for key in ("params", "model_state", "opt_state", "ema_params"):
        jax.tree.map(np.testing.assert_array_equal, before[key], after[key])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after["params"]))


def test_bad_inputs_are_clear_errors(config_file, tmp_path):
    def error_of(change, workdir=str(tmp_path / "run")):
        config = _config(config_file)
        change(config)
        with pytest.raises(JaxkdError) as error:
            train.train_and_evaluate(config, workdir)
        assert error.value.exit_code == 2
        return str(error.value)

    def set_fields(**fields):
        def change(config):
            for path, value in fields.items():
                *sections, name = path.split("__")
                target = config
                for section in sections:
                    target = target[section]
                target[name] = value
        return change

    message = error_of(set_fields(method__name="rsdd"))
    listed = message.split("available methods: ")[1].split(", ")
    assert "unknown method 'rsdd'" in message and {"kd", "ofa", "pat", "rsd"} <= set(listed)
    def cka_without_teacher(config):
        config.method = distill.method_config("ce")
        config.eval_cka_examples = 64

    message = error_of(cka_without_teacher)
    assert "eval_cka_examples" in message and "'ce' has no teacher" in message
    message = error_of(set_fields(dataset__name="mnist"))
    assert "unknown dataset 'mnist'" in message and "sklearn_digits, cifar100" in message
    message = error_of(set_fields(dataset__name="cifar100", dataset__data_dir=str(tmp_path)))
    assert "dataset 'cifar100' is not prepared" in message
    message = error_of(set_fields(lable_smoothing=0.1))
    assert "unknown config field(s): lable_smoothing (did you mean label_smoothing?)" in message
    message = error_of(set_fields(dataset__image_size=20))
    assert "cannot take 20px images" in message

    # A teacher export that claims the right model but holds another's weights.
    teacher = random_teacher(str(tmp_path / "teacher"), 10, overrides={**TINY_VIT, "depth": 5})
    with open(os.path.join(teacher, "model.json")) as f:
        meta = json.load(f)
    with open(os.path.join(teacher, "model.json"), "w") as f:
        json.dump({**meta, "overrides": TINY_VIT}, f)
    message = error_of(set_fields(teacher__checkpoint=teacher))
    assert "does not match its model" in message
    assert "unexpected: params/blocks_4/" in message

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = error_of(lambda config: None, workdir=str(blocker / "sub"))
    assert f"cannot create workdir '{blocker}/sub': Not a directory" in message
    message = error_of(lambda config: None, workdir=str(blocker))
    assert f"workdir '{blocker}' is a file, not a directory" in message
