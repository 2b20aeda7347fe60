"""Config files parse for every pair, and bad configs fail with a clear message and exit 2."""

import os
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


def test_digits_demo_config_is_a_suite():
    config = _load("configs/rsd_digits.py")
    assert list(config.run_order) == ["teacher", "scratch", "kd", "rsd"]
    assert config.runs.rsd.teacher.checkpoint == "run:teacher"


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
