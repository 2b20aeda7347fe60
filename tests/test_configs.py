"""Config files parse for every pair, and bad configs fail with a clear message and exit 2."""

import os
import re
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (the loader main uses)

from jaxkd import recipes
from jaxkd.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize("teacher,student", recipes.CIFAR_PAIRS)
def test_rsd_cifar_parses_for_every_pair(teacher, student):
    config = _load("configs/rsd_cifar.py", f"{teacher},{student}")
    assert config.teacher.name == recipes.ALIASES[teacher]
    assert config.student.name == recipes.ALIASES[student]
    assert config.method.name == "rsd" and config.method.rsd_weight == 0.1
    assert config.dataset.image_size == 224 and config.num_epochs == 300
    cnn = recipes.student_family(config.student.name) == "cnn"
    assert config.optimizer.name == ("sgd" if cnn else "adamw")


def test_unknown_pair_lists_the_pairs():
    with pytest.raises(ConfigError, match="swin_t,res18"):
        _load("configs/rsd_cifar.py", "swin_t,res19")


def test_digits_demo_config_is_a_suite_of_populations():
    from jaxkd import population

    config = _load("configs/rsd_digits.py")
    assert list(config.run_order) == ["teacher", "scratch", "kd", "rsd"]
    assert config.runs.rsd.teacher.checkpoint == "run:teacher"
    assert not population.run_config.is_population(config.runs.teacher)
    for name in ("scratch", "kd", "rsd"):
        members = population.members(config.runs[name])
        assert [(m.seed, m.settings) for m in members] == [(0, {}), (1, {}), (2, {})]


@pytest.mark.parametrize("pair", ["swin_t,res18", "mixer_b16,deit_t", "convnext_t,resmlp_s12"])
def test_rsd_sweep_config_holds_the_papers_tables(pair):
    from jaxkd import population

    suite = _load("configs/rsd_sweep_cifar.py", pair)
    assert list(suite.run_order) == ["lambda", "kappa", "gamma_half", "gamma_1", "gamma_2",
                                     "gamma_4", "gamma_6"]
    lambdas = population.members(suite.runs["lambda"])
    assert sorted({m.settings["method.rsd_weight"] for m in lambdas}) == [
        0.05, 0.075, 0.1, 0.15, 0.2]
    assert len(lambdas) == 15 and {m.seed for m in lambdas} == {0, 1, 2}
    kappas = population.members(_load("configs/rsd_sweep_cifar.py", pair + ",kappa"))
    assert sorted({m.settings["method.kappa"] for m in kappas}) == [0.0, 0.001, 0.01, 0.02]
    assert len(kappas) == 12
    widths = _load("configs/rsd_sweep_cifar.py", pair + ",aad")
    assert [widths.runs[name].method.expansion for name in widths.run_order] == [
        0.5, 1.0, 2.0, 4.0, 6.0]
    for name in widths.run_order:
        assert [m.seed for m in population.members(widths.runs[name])] == [0, 1, 2]
    teacher = recipes.ALIASES[pair.split(",")[0]]
    assert suite.runs["lambda"].teacher.name == teacher
    assert suite.runs["gamma_4"].teacher.checkpoint == f"teachers/{pair.split(',')[0]}_cifar100"
    with pytest.raises(ConfigError, match="teacher,student\\[,table\\]"):
        _load("configs/rsd_sweep_cifar.py", pair + ",gamma")


def _main(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxkd.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_bad_pair_exits_2_without_traceback(tmp_path):
    proc = _main("--config=configs/rsd_cifar.py:swin_t,res19", f"--workdir={tmp_path}")
    assert proc.returncode != 0
    assert "not a known teacher,student pair" in proc.stderr


def test_cli_misspelt_field_is_an_error(tmp_path):
    proc = _main("--config=configs/rsd_cifar.py", "--config.optimiser.lr=0.1",
                 f"--workdir={tmp_path}")
    assert proc.returncode != 0
    assert "optimiser" in proc.stderr


def test_cli_dataset_not_prepared_fails_fast_and_clearly(tmp_path):
    proc = _main("--config=configs/rsd_cifar.py", f"--config.dataset.data_dir={tmp_path}",
                 "--config.teacher.checkpoint=/nonexistent", f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cifar100" in proc.stderr and str(tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override,expected", [
    ("--config.totl_steps=3", "unknown config field --config.totl_steps (did you mean "
                              "--config.total_steps?)"),
    ("--config.batch_size=0", "batch_size=0 must be a positive number of images"),
    ("--config.dataset.train_fraction=0.0", "dataset.train_fraction=0.0 must be in (0, 1]"),
], ids=["misspelt", "zero_batch", "empty_fraction"])
def test_cli_bad_values_are_one_line_errors(tmp_path, override, expected):
    proc = _main("--config=configs/rsd_cifar.py", override, f"--workdir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", -8, "batch_size=-8"),
    ("total_steps", -1, "total_steps=-1"),
    ("num_epochs", float("nan"), "num_epochs=nan"),
    ("eval_every_steps", 0, "eval_every_steps=0"),
    ("log_every_steps", 0, "log_every_steps=0"),
    ("checkpoint_every_steps", -5, "checkpoint_every_steps=-5"),
    ("label_smoothing", 1.0, "label_smoothing=1.0"),
    ("ema_decay", -0.1, "ema_decay=-0.1"),
    ("dataset.image_size", 0, "dataset.image_size=0"),
    ("dataset.train_fraction", 1.5, "dataset.train_fraction=1.5"),
    ("optimizer.lr", -0.1, "optimizer.lr=-0.1"),
    ("optimizer.momentum", 1.0, "optimizer.momentum=1.0"),
    ("teacher.min_top1", 101.0, "teacher.min_top1=101.0"),
    ("student.name", "", "student.name must not be empty"),
    ("dataset.name", " ", "dataset.name must not be empty"),
])
def test_config_values_out_of_range_are_refused(field, value, message):
    from jaxkd import run_config

    config = _load("configs/rsd_cifar.py")
    run_config.check_config_values(config)  # the config as written is valid
    section, _, key = field.rpartition(".")
    with config.unlocked():
        (config[section] if section else config)[key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_config.check_config_values(config)
