"""scripts/xla_cpu_options.py: its whole path on a small input, so it cannot rot."""

import json

import pytest

from jaxkd.errors import ConfigError

from helpers import load_script


def test_xla_cpu_options_compares_variants_and_reports_failures(tmp_path, capsys):
    script = load_script("xla_cpu_options")
    results = script.main(["--model", "resnet18", "--batch-size", "2", "--image-size", "32",
                           "--rounds", "1", "--option", "xla_cpu_enable_fast_min_max=false",
                           "--option", "xla_no_such_option=1",
                           "--json", str(tmp_path / "options.json")])
    variants = results["variants"]
    assert variants["default"]["max_grad_difference"] == 0.0
    assert variants["default"]["step_s"] > 0
    assert variants["xla_cpu_enable_fast_min_max=false"]["options"] == {
        "xla_cpu_enable_fast_min_max": False}
    assert variants["xla_cpu_enable_fast_min_max=false"]["max_grad_difference"] < 1e-5
    assert "error" in variants["xla_no_such_option=1"]
    out = capsys.readouterr().out
    assert "| xla_no_such_option=1 | did not compile" in out
    assert json.loads((tmp_path / "options.json").read_text())["model"] == "resnet18"
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        script.main(["--option", "no_value"])
