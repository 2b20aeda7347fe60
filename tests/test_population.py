"""Population training: K students against one teacher forward per batch (jaxkd.population).

Each member must compute what a separate run with its seed and values computes; outputs,
frozen members, resume and preemption are checked on runs of two members.
"""

import json
import logging
import os
import re
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxkd import population, recipes, runner, sharding, step, train
from jaxkd.errors import ConfigError, NonFiniteLossError, Preempted
from jaxkd.metric_writer import read_metrics

from helpers import TINY_VIT, VIT, load_script, random_batches, random_teacher, tiny_config


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return random_teacher(str(tmp_path_factory.mktemp("teacher")), num_classes=10)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _mesh(n):
    return sharding.data_mesh(jax.devices()[:n])


def _config(teacher_dir, method="rsd", **fields):
    """The tiny student with drop-path (the step's rng) and EMA."""
    config = tiny_config(method, teacher_checkpoint=teacher_dir, **fields)
    config.student.overrides = dict(TINY_VIT, drop_path_rate=0.1)
    config.ema_decay = 0.9
    return config


# --- members and what may be swept -------------------------------------------------------------
def test_members_are_the_product_of_the_sweep_and_the_seeds(teacher_dir):
    config = recipes.population(_config(teacher_dir), seeds=(3, 7), sweep={
        "method.rsd_weight": (0.1, 0.2), "optimizer.lr": (1e-3, 2e-3)})
    members = population.members(config)
    assert [(m.seed, m.settings) for m in members[:3]] == [
        (3, {"method.rsd_weight": 0.1, "optimizer.lr": 1e-3}),
        (7, {"method.rsd_weight": 0.1, "optimizer.lr": 1e-3}),
        (3, {"method.rsd_weight": 0.1, "optimizer.lr": 2e-3})]
    assert len(members) == 8 and [m.index for m in members] == list(range(8))
    last = members[-1].config
    assert (last.seed, last.method.rsd_weight, last.optimizer.lr) == (7, 0.2, 2e-3)
    assert members[-1].label == "member 7 (seed 7, method.rsd_weight=0.2, optimizer.lr=0.002)"
    # The base config is left as it was; the members are no populations themselves.
    assert config.method.rsd_weight == 0.1 and not population.run_config.is_population(last)
    # Seeds alone: the config's seed is the data seed, each member's its own.
    alone = population.members(recipes.population(_config(teacher_dir), seeds=(5,)))
    assert [(m.seed, m.settings) for m in alone] == [(5, {})]


@pytest.mark.parametrize("sweep,message", [
    ({"seed": (0, 1)}, "list the seeds in population.seeds"),
    ({"student.name": ("resnet18",)}, "cannot sweep student.name"),
    ({"method.name": ("kd",)}, "cannot sweep method.name"),
    ({"augment.flip": (0, 1)}, "cannot sweep augment.flip"),
    ({"dataset.image_size": (16, 32)}, "cannot sweep dataset.image_size"),
    ({"batch_size": (8, 16)}, "cannot sweep batch_size"),
    ({"method.distance": (1, 2)}, "cannot sweep method.distance"),
    ({"method.normalize": (0, 1)}, "cannot sweep method.normalize"),
    ({"optimizer.nesterov": (0, 1)}, "cannot sweep optimizer.nesterov"),
    ({"method.temperature": (1.0, 4.0)}, "method 'rsd' has no field 'temperature'"),
    ({"optimiser.lr": (0.1,)}, "the config has no field optimiser.lr"),
    ({"method.kappa": ()}, "needs a non-empty tuple of finite numbers"),
    ({"method.kappa": (0.01, float("nan"))}, "needs a non-empty tuple of finite numbers"),
    ({"method.kappa": (0.01, 0.01)}, "repeats a value"),
    ({"method.stats_groups": (1, 2.5)}, "method.stats_groups is an integer field"),
    ({"label_smoothing": (0.1, 1.0)}, "(seed 0, label_smoothing=1): invalid config value(s): "
                                      "label_smoothing=1.0 must be in [0, 1)"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_what_cannot_be_swept_is_refused_with_a_reason(teacher_dir, sweep, message):
    config = recipes.population(_config(teacher_dir), sweep=sweep)
    with pytest.raises(ConfigError, match=re.escape(message)):
        population.members(config)


def test_population_settings_are_checked(teacher_dir):
    def error(**fields):
        config = recipes.population(_config(teacher_dir), **fields)
        with pytest.raises(ConfigError) as e:
            population.members(config)
        return str(e.value)

    assert "distinct integers" in error(seeds=(1, 1))
    assert "must be one of ('loop', 'vmap')" in error(seeds=(0, 1), map="pmap")
    assert "sweep method.kappa with map='loop'" in error(
        sweep={"method.kappa": (0.0, 0.01)}, map="vmap")
    assert "needs map='vmap'" in error(seeds=(0, 1), member_devices=2)
    assert "must divide the 3 members" in error(seeds=(0, 1, 2), map="vmap", member_devices=2)


def test_a_sweep_that_changes_the_state_shapes_is_refused(teacher_dir):
    config = recipes.population(_config(teacher_dir), sweep={"method.expansion": (1.0, 2.0)})
    with pytest.raises(ConfigError, match=r"method.expansion change\(s\) the train state's "
                                          r"arrays \(member 1 .*make a suite of populations"):
        population.build(config, 10, 4, 4, _mesh(1))


# --- the step ------------------------------------------------------------------------------------
def _separate_runs(psetup, batches, mesh):
    """Each member's run on its own (jaxkd.step): (final states, per-step metrics)."""
    states, metrics = [], []
    for member in psetup.members:
        setup, teacher_variables = step.build(member.config, 10, 4, 4, mesh)
        state, train_step, rows = step.init_state(setup, member.seed), \
            step.jit_train_step(setup), []
        for batch in batches:
            state, m = train_step(state, teacher_variables, sharding.global_batch(batch, mesh))
            rows.append(jax.device_get(m))
        states.append(state)
        metrics.append(rows)
    return states, metrics


def _assert_close(ours, theirs, what):
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("devices,seeds,sweep", [
    (1, (0,), {"optimizer.lr": (1e-3, 3e-3)}),
    (8, (1, 2), {"method.rsd_weight": (0.3,), "label_smoothing": (0.1,)}),
], ids=["1_device", "8_devices"])
def test_each_member_computes_its_own_separate_run(teacher_dir, devices, seeds, sweep,
                                                   monkeypatch):
    mesh = _mesh(devices)
    config = recipes.population(_config(teacher_dir), seeds=seeds, sweep=sweep)
    psetup, teacher_variables = population.build(config, 10, 4, 4, mesh)
    state = population.init_state(psetup)
    batches = random_batches(2)
    train_step = population.jit_train_step(psetup)
    teacher_forwards = []
    real_forward = step.teacher_forward
    monkeypatch.setattr(step, "teacher_forward", lambda *args, **kwargs: (
        teacher_forwards.append(1), real_forward(*args, **kwargs))[1])
    rows = []
    for batch in batches:
        state, metrics = train_step(state, teacher_variables, sharding.global_batch(batch, mesh))
        rows.append(jax.device_get(metrics))
    assert len(teacher_forwards) == 1  # traced once: one teacher forward for the students
    monkeypatch.setattr(step, "teacher_forward", real_forward)
    separate_states, separate_metrics = _separate_runs(psetup, batches, mesh)
    assert psetup.size == 2
    for member, theirs, their_rows in zip(psetup.members, separate_states, separate_metrics):
        ours = population.member_state(state, member.index)
        _assert_close(ours, theirs, f"{member.label}: state")
        for row, their_row in zip(rows, their_rows):
            assert set(row) == set(their_row) | {"train/frozen_step"}
            for key, value in their_row.items():
                np.testing.assert_allclose(row[key][member.index], value, rtol=1e-5,
                                           atol=1e-6, err_msg=f"{member.label}: {key}")
    # The members differ (seeds and swept values do something).
    losses = rows[-1]["train/loss"]
    assert losses[0] != losses[1]
    assert np.all(np.asarray(state.frozen_step) == 0)


def test_vmap_over_members_spread_over_a_member_by_data_mesh(teacher_dir):
    """map='vmap' on a (2 member x 4 data) mesh, FSDP inside each member group: each member
    on its half of the devices computes the separate run on 4 devices. (SGD: Adam's
    normalised updates turn the float noise of exactly-zero gradients, such as attention's
    key biases, into visible steps.)"""
    config = recipes.population(_config(teacher_dir, "kd"), seeds=(0, 1), map="vmap",
                                member_devices=2)
    config.optimizer.update(name="sgd", lr=0.05)
    config.sharding = "fsdp"
    mesh = population.mesh(config)
    assert dict(mesh.shape) == {"member": 2, "data": 4}
    psetup, teacher_variables = population.build(config, 10, 4, 4, mesh)
    state = population.init_state(psetup)
    train_step = population.jit_train_step(psetup)
    batches = random_batches(2)
    rows = []
    for batch in batches:
        state, metrics = train_step(state, teacher_variables, sharding.global_batch(batch, mesh))
        rows.append(jax.device_get(metrics))
    qkv = state.members.params["student"]["blocks_0"]["attn"]["qkv"]["kernel"]  # [2, 32, 96]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("member", None, "data")
    assert qkv.addressable_shards[0].data.shape == (1, 32, 24)  # one member, 1/4 of it
    separate_states, separate_metrics = _separate_runs(psetup, batches, _mesh(4))
    for member, theirs, their_rows in zip(psetup.members, separate_states, separate_metrics):
        _assert_close(population.member_state(state, member.index), theirs, member.label)
        for row, their_row in zip(rows, their_rows):
            for key, value in their_row.items():
                np.testing.assert_allclose(row[key][member.index], value, rtol=1e-5,
                                           atol=1e-6, err_msg=f"{member.label}: {key}")


def test_per_example_state_and_memory_banks_carry_the_member_axis(tmp_path, teacher_dir,
                                                                 monkeypatch):
    """PAT (per-example feedback, teacher re-run with its prompts) and CRD (memory banks):
    each member has its own rows; PAT's prompted teacher runs per member, its plain outputs
    once. Traced, not compiled."""
    from jaxkd import distill

    cnn = {"layers": [1, 1, 1, 1]}
    teacher = random_teacher(str(tmp_path / "cnn"), 10, name="resnet18", overrides=cnn)
    config = recipes.population(tiny_config("pat", teacher_checkpoint=teacher), seeds=(0, 1),
                                sweep={"method.hcl_weight": (1.0, 0.5)})
    config.teacher.name, config.teacher.overrides = "resnet18", cnn
    mesh = _mesh(8)
    psetup, teacher_variables = population.build(config, 10, 4, 4, mesh)
    abstract = population.abstract_state(psetup)
    per_example = abstract.members.model_state["method"][distill.PER_EXAMPLE_COLLECTION]
    assert all(x.shape[:2] == (4, 16) and x.sharding.spec[:2] == (None, "data")
               for x in jax.tree.leaves(per_example))
    forwards = []
    real_forward = step.teacher_forward
    monkeypatch.setattr(step, "teacher_forward", lambda *args, **kwargs: (
        forwards.append("rerun" if "pre_stage" in kwargs or len(args) > 3 else "plain"),
        real_forward(*args, **kwargs))[1])
    population.jit_train_step(psetup).lower(
        abstract, teacher_variables, sharding.global_batch(random_batches(1)[0], mesh))
    assert sorted(forwards) == ["plain"] + ["rerun"] * 4

    crd = recipes.population(tiny_config("crd", teacher_checkpoint=teacher_dir,
                                         num_negatives=8, negatives="uniform"), seeds=(0, 1))
    psetup, _ = population.build(crd, 10, 4, 4, mesh, num_train_examples=40)
    banks = population.abstract_state(psetup).members.model_state["method"]["memory"]
    assert banks and all(x.shape[0] == 2 for x in jax.tree.leaves(banks))


# --- a population run: outputs, a frozen member, resume -----------------------------------------
STEPS = 3


def _run_config(teacher_dir, digits_dir):
    """KD, two members: lr 1e-3 (the base config's) and lr 1e30, which turns the loss
    non-finite at step 2 and freezes that member."""
    config = tiny_config("kd", data_dir=digits_dir, teacher_checkpoint=teacher_dir,
                         steps=STEPS, temperature=2.0)
    config.checkpoint_every_steps = 1
    return recipes.population(config, seeds=(0,), sweep={"optimizer.lr": (1e-3, 1e30)})


@pytest.fixture(scope="module")
def population_run(teacher_dir, digits_dir, tmp_path_factory):
    """(workdir, result, log text) of the straight run through jaxkd.runner."""
    workdir = str(tmp_path_factory.mktemp("population"))
    handler = logging.Handler()
    records = []
    handler.emit = records.append
    logging.getLogger("jaxkd").addHandler(handler)
    try:
        result = runner.run(_run_config(teacher_dir, digits_dir), workdir)
    finally:
        logging.getLogger("jaxkd").removeHandler(handler)
    return workdir, result, "\n".join(r.getMessage() for r in records)


def _state_leaves(workdir, step_number):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    state = manager.restore(step_number, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    manager.close()
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def test_population_run_writes_per_member_outputs_and_freezes_a_diverged_member(
        population_run, teacher_dir, digits_dir, tmp_path):
    workdir, result, log_text = population_run
    members = result["population"]
    assert [(m["member"], m["seed"], m["settings"]) for m in members] == [
        (0, 0, {"optimizer.lr": 1e-3}), (1, 0, {"optimizer.lr": 1e30})]
    # Member 1 is frozen at step 2, reported with its step and value; member 0 trains on.
    assert members[0]["frozen"] is None
    assert members[1]["frozen"]["step"] == 2
    assert not np.isfinite(members[1]["frozen"]["loss"])
    assert "member 1 (seed 0, optimizer.lr=1e+30) frozen at step 2: non-finite loss" in log_text
    rows = read_metrics(workdir)
    train_steps = {i: [r["step"] for r in rows if r.get("member") == i and "train/loss" in r]
                   for i in (0, 1)}
    assert train_steps == {0: [1, 2, 3], 1: [1, 2]}
    assert all(r["settings"] == members[r["member"]]["settings"] and r["seed"] == 0
               for r in rows if "member" in r)
    assert sorted(os.listdir(os.path.join(workdir, "tensorboard")))[-2:] == ["member_0",
                                                                            "member_1"]
    # Its state is the one before step 2: the checkpoints of steps 2 and 3 hold the same.
    at_2, at_3 = _state_leaves(workdir, 2), _state_leaves(workdir, 3)
    params = [k for k in at_2 if k.startswith("['members']['params']")]
    assert params and all(np.array_equal(at_2[k][1], at_3[k][1]) for k in params)
    assert all(np.all(np.isfinite(at_3[k][1])) for k in params)
    assert not all(np.array_equal(at_2[k][0], at_3[k][0]) for k in params)
    assert at_3["['frozen_step']"].tolist() == [0, 2]
    # One export per member, with its seed, swept values and results.
    for member in members:
        with open(os.path.join(workdir, "export", f"member_{member['member']}",
                               "model.json")) as f:
            meta = json.load(f)
        assert (meta["seed"], meta["settings"]) == (member["seed"], member["settings"])
        assert meta["eval/top1"] == member["eval/top1"]
        assert meta["teacher_checkpoint"] == teacher_dir
    # The summary: one row per setting, the frozen member marked and left out.
    with open(os.path.join(workdir, "summary.md")) as f:
        summary = f.read()
    assert f"| optimizer.lr=0.001 | 10.00 | {members[0]['eval/top1']:.2f} ± 0.00 | 1 |" \
        in summary.replace(f"{result['eval/teacher_top1']:.2f}", "10.00")
    assert "| 0 (1 frozen) | - |" in summary
    assert "member 1 (seed 0, optimizer.lr=1e+30): frozen at step 2" in summary
    assert os.path.exists(os.path.join(workdir, "accuracy.png"))
    assert os.path.exists(os.path.join(workdir, "sweep.png"))

    # Member 0 is the run of its own with that seed and values.
    single = _run_config(teacher_dir, digits_dir)
    single.population = recipes.base_config().population
    alone = train.train_and_evaluate(single, str(tmp_path))
    np.testing.assert_allclose(alone["eval/top1"], members[0]["eval/top1"])
    theirs = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    ours = [r for r in rows if r.get("member") == 0 and "train/loss" in r]
    assert len(ours) == len(theirs) == STEPS
    for a, b in zip(ours, theirs):
        for key, value in b.items():
            np.testing.assert_allclose(a[key], value, rtol=1e-5, err_msg=key)


def test_sigint_stops_the_population_and_it_resumes_bitwise(population_run, teacher_dir,
                                                           digits_dir, tmp_path, monkeypatch):
    reference = population_run[0]
    real_batches = train.data.RandomSampler.batches

    def interrupted_at_second(*args, **kwargs):
        for step_number, batch in enumerate(real_batches(*args, **kwargs), 1):
            if step_number == 2:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(train.data.RandomSampler, "batches", interrupted_at_second)
    workdir = str(tmp_path / "run")
    with pytest.raises(Preempted, match="stopped by SIGINT after step 2"):
        train.train_and_evaluate(_run_config(teacher_dir, digits_dir), workdir)
    monkeypatch.setattr(train.data.RandomSampler, "batches", real_batches)
    train.train_and_evaluate(_run_config(teacher_dir, digits_dir), workdir)
    ours, theirs = _state_leaves(workdir, STEPS), _state_leaves(reference, STEPS)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].tobytes() == theirs[key].tobytes(), key
    # The same rows (a row of a step written again after the resume replaces the first).
    def rows(w):
        return {(r["step"], r.get("member"), k): v for r in read_metrics(w)
                for k, v in r.items() if k.startswith(("train/", "eval/"))}
    assert rows(workdir) == rows(reference)


def test_the_run_stops_once_every_member_is_frozen(teacher_dir, digits_dir):
    config = recipes.population(_config(teacher_dir), seeds=(0, 1))
    trainee = population.Population.__new__(population.Population)
    trainee.members = population.members(config)
    trainee.psetup = type("Setup", (), {"freeze": True})()

    def fetched(frozen_steps):
        return [{"train/frozen_step": np.asarray(frozen_steps), "train/loss":
                 np.asarray([np.nan, np.inf]), "train/grad_norm": np.asarray([np.nan] * 2)}]

    class Checkpoints:
        directory = "/w/checkpoints"

        def latest_step(self):
            return 4

    trainee.check_nonfinite(fetched([5, 0]), 5, Checkpoints())  # one member left: go on
    with pytest.raises(NonFiniteLossError, match=r"every member .*member 0 \(seed 0\) at step "
                                                 r"5; member 1 \(seed 1\) at step 6\. Last "
                                                 r"checkpoint: step 4 in /w/checkpoints"):
        trainee.check_nonfinite(fetched([5, 6]), 6, Checkpoints())


def test_benchmark_prints_the_population_speed_up_line():
    benchmark = load_script("benchmark")
    # T = 1 s teacher forward, S = 1 s rest of a step: 4 members ideally take 1 + 4 s.
    assert benchmark.ideal_speedup(4, 1.0, 2.0) == 8.0 / 5.0
    assert benchmark.ideal_speedup(1, 1.0, 2.0) == 1.0
    result = {"rows": [
        {"members": 4, "map": "loop", "step_s": 5.5, "single_step_s": 2.0,
         "teacher_forward_s": 1.0, "speedup": 8.0 / 5.5,
         "ideal_speedup": benchmark.ideal_speedup(4, 1.0, 2.0), "compile_s": 30.0}]}
    lines = benchmark.population_lines(result)
    assert lines[-1] == "population speed-up (K=4): 1.45x (ideal 1.60x)"
    assert "| 4 | loop | 5500 | 2000 | 1000 | 1.45x | 1.60x | 91% | 30.0 |" in lines


def test_benchmark_measures_a_tiny_population_end_to_end(tmp_path, capsys):
    """The script's whole path (its part in a subprocess, the table, the speed-up line, the
    JSON) on a tiny DeiT pair, without PyTorch."""
    benchmark = load_script("benchmark")
    tiny = json.dumps(TINY_VIT)
    results = benchmark.main([
        "--teacher", VIT, "--student", VIT, "--teacher-overrides", tiny,
        "--student-overrides", tiny, "--method", "kd", "--num-classes", "10",
        "--batch-size", "8", "--image-size", "16", "--warmup", "1", "--steps", "1",
        "--population", "2", "--skip-torch", "--json", str(tmp_path / "bench.json")])
    rows = results["parts"]["jaxkd"]["population"]["rows"]
    assert [r["members"] for r in rows] == [2] and rows[0]["speedup"] > 0
    assert "population speed-up (K=2)" in capsys.readouterr().out
    assert json.loads((tmp_path / "bench.json").read_text())["parts"]["jaxkd"]["population"]
