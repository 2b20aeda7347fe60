"""scripts/gpu_benchmark.py: its tiny mode end to end without TensorFlow (as on the GPU
machine), and its time budget, stop on a failing jaxkd step and package check on made-up
runs."""

import argparse
import json
import os
import subprocess
import sys

import jax
import pytest

from helpers import load_script

gpu_benchmark = load_script("gpu_benchmark")
SCRIPT = os.path.join(gpu_benchmark.SCRIPTS, "gpu_benchmark.py")

# Loaded by every Python process of the run (PYTHONPATH): TensorFlow and TFDS absent as on
# the GPU machine (import fails, importlib.util.find_spec says None), a deprecated API called
# from jaxkd or a benchmark script an error, and the process counted.
SITECUSTOMIZE = """
import os, sys, warnings
for name in ("tensorflow", "tensorflow_datasets"):
    sys.modules[name] = None
warnings.filterwarnings("error", category=DeprecationWarning, module=r"(jaxkd|__main__)(\\.|$)")
with open({processes!r}, "a") as f:
    f.write(f"{{os.getpid()}}\\n")
"""


def _rows(results):
    return {(r["teacher"], r["student"], r["method"], r["dtype"], r["implementation"]): r
            for r in results["rows"]}


def _expected(plan):
    return {(*gpu_benchmark.PAIRS[j.pair], j.method, j.dtype, j.implementation)
            for j in gpu_benchmark.jobs(plan)}


def test_tiny_run_without_tensorflow(tmp_path):
    site, out = tmp_path / "site", tmp_path / "out"
    site.mkdir()
    processes = tmp_path / "processes"
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(processes=str(processes)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
    env["PYTHONPATH"] = os.pathsep.join([str(site), gpu_benchmark.REPO])
    blocked = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env,
                             capture_output=True, text=True)
    assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--tiny", "--out-dir", str(out), "--budget", "1800",
         "--compile-cache", jax.config.jax_compilation_cache_dir],
        env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = proc.stdout.splitlines()[1]
    for package in ("python", "jax", "jaxlib", "flax", "optax", "torch", "timm"):
        assert f"{package} " in first, first
    assert "jax backend cpu" in proc.stdout

    results = json.loads((out / "gpu_benchmark.json").read_text())
    markdown = (out / "gpu_benchmark.md").read_text()
    assert results["status"] == "complete"
    rows = _rows(results)
    assert set(rows) == _expected(gpu_benchmark.TINY_PLAN)
    for (teacher, student, method, dtype, impl), r in rows.items():
        line = (f"| {teacher} -> {student} | {method} | {dtype} | "
                f"{gpu_benchmark.LABELS[impl]} |")
        assert sum(line in m for m in markdown.splitlines()) == 1, line
        if impl == gpu_benchmark.POPULATION and not results["population_available"]:
            assert r["status"] == "not available"
            continue
        assert r["status"] == "ok", (r["status"], r.get("note"))
        for key in ("step_s", "images_per_s", "peak_memory_bytes", "mfu", "mfu_bf16_peak"):
            assert r[key] > 0, (key, r)
        if impl in ("jaxkd", "torch_compile"):
            assert r["compile_s"] > 0
        if impl.startswith("torch"):
            assert r["jaxkd_speedup"] > 0
        if impl == gpu_benchmark.POPULATION:
            assert r["population_speedup"] > 0
    # The parent, the environment check and one process per run loaded the sitecustomize.
    runs = sum(r["status"] == "ok" for r in rows.values())
    assert len(processes.read_text().split()) >= 2 + runs
    goals = {(g["goal"], g["pair"], g["method"]): g for g in results["goals"]}
    speedup = goals[("jaxkd images/s over torch.compile's", "swin_t -> res18", "rsd")]
    assert speedup["value"] == pytest.approx(
        rows[("swin_t", "res18", "rsd", "bfloat16", "torch_compile")]["jaxkd_speedup"])
    mfu = goals[("MFU of the jaxkd step, ViT-family student", "convnext_t -> deit_t", "rsd")]
    assert mfu["met"] is None  # tiny mode runs that pair in float32 only
    assert len([m for m in markdown.splitlines() if m.startswith("| jaxkd images/s")]) == 4


class FakeParts:
    """Stands in for benchmark.py's processes: each part takes `seconds` of a fake clock and
    reports figures of an H200 (or fails, for `fail`)."""

    def __init__(self, seconds, fail=()):
        self.now, self.seconds, self.fail, self.calls = 0.0, seconds, fail, []

    def clock(self):
        return self.now

    def run_part(self, part, argv, args):
        self.calls.append((part, args.teacher, args.method, args.compute_dtype, args.timeout))
        self.now += self.seconds[part]
        if part in self.fail:
            return {"skipped": "failed (exit 1): AttributeError: module 'jax' has no "
                               "attribute 'gone'",
                    "stderr_tail": ["Traceback (most recent call last):",
                                    '  File "/repo/jaxkd/step.py", line 7, in build',
                                    "AttributeError: module 'jax' has no attribute 'gone'"]}
        step_s = {"jaxkd": 0.1, "torch_compile": 0.2, "torch_eager": 0.4}[part]
        result = {"step_s": step_s, "images_per_s": args.batch_size / step_s,
                  "peak_memory_bytes": 2 ** 30}
        if part == "jaxkd":
            result.update(flops_per_step=2e13, platform="gpu", device_kind="NVIDIA H200",
                          num_devices=1, compile_s=30.0)
        return result


def _run(out_dir, budget, fake):
    args = gpu_benchmark.parse_args(["--out-dir", str(out_dir), "--budget", str(budget)])
    environment = {"jax_backend": "gpu", "jax_devices": ["gpu: NVIDIA H200"],
                   "torch_cuda": True, "torch_cuda_version": "13.0",
                   "torch_device": "NVIDIA H200"}
    bench = gpu_benchmark.Run(args, gpu_benchmark.PLAN, environment, run_part=fake.run_part,
                              clock=fake.clock)
    bench.population = False  # whatever benchmark.py offers: a fixed plan here
    return bench


def test_budget_skips_what_does_not_fit(tmp_path):
    fake = FakeParts({"jaxkd": 60, "torch_compile": 200, "torch_eager": 30})
    _run(tmp_path, 450, fake).execute()
    rows = _rows(json.loads((tmp_path / "gpu_benchmark.json").read_text()))
    assert set(rows) == _expected(gpu_benchmark.PLAN)
    # The second torch.compile (200 s, like the first) does not fit in the 130 s left; the
    # eager runs and one more jaxkd step do, each with the time left as its timeout.
    assert [call[:3] + call[4:] for call in fake.calls] == [
        ("jaxkd", "swin_t", "rsd", 450), ("jaxkd", "convnext_t", "rsd", 390),
        ("torch_compile", "swin_t", "rsd", 330), ("torch_eager", "swin_t", "rsd", 130),
        ("torch_eager", "convnext_t", "rsd", 100), ("jaxkd", "swin_t", "kd", 70)]
    assert fake.now == 440
    compiled = rows[("convnext_t", "deit_t", "rsd", "bfloat16", "torch_compile")]
    assert compiled["status"] == "not run"
    assert compiled["note"] == "expected to take ~200 s, 130 s of the budget left"
    assert sum(r["status"] == "ok" for r in rows.values()) == 6
    assert {r["status"] for r in rows.values()} == {"ok", "not run", "not available"}
    jaxkd = rows[("swin_t", "res18", "rsd", "bfloat16", "jaxkd")]
    # 2e13 FLOPs in 0.1 s against the H200's dense bf16 peak.
    assert jaxkd["mfu_bf16_peak"] == pytest.approx(2e13 / 0.1 / 989.4e12)
    eager = rows[("swin_t", "res18", "rsd", "bfloat16", "torch_eager")]
    assert eager["jaxkd_speedup"] == pytest.approx(4.0)
    assert eager["mfu_bf16_peak"] == pytest.approx(jaxkd["mfu_bf16_peak"] / 4)
    markdown = (tmp_path / "gpu_benchmark.md").read_text()
    assert ("| convnext_t -> deit_t | rsd | bfloat16 | PyTorch torch.compile | not run: "
            "expected to take ~200 s, 130 s of the budget left |") in markdown
    assert ("| jaxkd images/s over torch.compile's | swin_t -> res18 | rsd | 2.00x | 1.30x | "
            "yes |") in markdown
    assert ("| jaxkd images/s over torch.compile's | convnext_t -> deit_t | rsd | - | 1.30x | "
            "not measured |") in markdown
    assert ("| MFU of the jaxkd step, ViT-family student | convnext_t -> deit_t | rsd | 20.2% | "
            "40.0% | no |") in markdown


def test_everything_runs_within_a_large_budget(tmp_path):
    fake = FakeParts({"jaxkd": 60, "torch_compile": 200, "torch_eager": 30})
    _run(tmp_path, 10_000, fake).execute()
    rows = _rows(json.loads((tmp_path / "gpu_benchmark.json").read_text()))
    for key, r in rows.items():
        assert r["status"] == ("not available" if key[4] == gpu_benchmark.POPULATION
                               else "ok"), (key, r)
    # A float32 row's own MFU is against the TF32 peak, half the bf16 one.
    f32 = rows[("swin_t", "res18", "kd", "float32", "jaxkd")]
    assert f32["mfu"] == pytest.approx(2 * f32["mfu_bf16_peak"], rel=1e-3)


def test_first_jaxkd_failure_stops_with_the_versions(tmp_path):
    fake = FakeParts({"jaxkd": 5, "torch_compile": 1, "torch_eager": 1}, fail=("jaxkd",))
    bench = _run(tmp_path, 450, fake)
    with pytest.raises(gpu_benchmark.JaxkdError) as e:
        bench.execute()
    message = str(e.value)
    versions = gpu_benchmark.versions()
    assert f"jax {versions['jax']}" in message and f"flax {versions['flax']}" in message
    assert "AttributeError: module 'jax' has no attribute 'gone'" in message
    assert 'File "/repo/jaxkd/step.py", line 7, in build' in message
    assert len(fake.calls) == 1
    results = json.loads((tmp_path / "gpu_benchmark.json").read_text())
    assert results["status"] == "stopped: the first jaxkd run failed"
    statuses = {r["status"] for r in results["rows"]}
    assert statuses <= {"failed", "not run", "not available"}


def test_missing_package_is_named_with_how_to_bring_it(monkeypatch, capsys):
    monkeypatch.setitem(gpu_benchmark.REQUIRED, "no_such_module_xyz", "no-such-package")
    with pytest.raises(gpu_benchmark.JaxkdError, match="no-such-package.*--fetch-wheels"):
        gpu_benchmark.check(argparse.Namespace(tiny=True, budget=450))
    assert capsys.readouterr().out.startswith("versions: python ")
