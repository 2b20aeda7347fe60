r"""jaxkd against PyTorch eager and torch.compile on one GPU: one command, one time budget.

  scripts/gpu_benchmark.sh OUT_DIR            # installs .whl/*.whl, then runs this file
  python scripts/gpu_benchmark.py --out-dir OUT_DIR [--budget 450]
  python scripts/gpu_benchmark.py --out-dir OUT_DIR --tiny    # tiny models, CPU is enough

For Swin-T -> ResNet18 and ConvNeXt-T -> DeiT-T (RSD, KD, OFA; bf16 and float32; batch 128 at
224 px, 1000 classes) it runs scripts/benchmark.py's parts, each in a process of its own: the
jitted jaxkd step, PyTorch eager and torch.compile (bf16 autocast and channels_last; TF32
matmuls in float32, as XLA does), and, where benchmark.py has `--population`, a population of
students in one step. Reported: step time, images/s, compile time, peak device memory, MFU
(the jaxkd step's XLA FLOP count over the step time and the device's dense bf16 peak) and
jaxkd's speed-up, with the issue's goals checked.

The runs go in PLAN's order, most important first; each gets the time left as its timeout,
and one not expected to fit in what is left is not started (the table says so). OUT_DIR's
gpu_benchmark.json and gpu_benchmark.md are rewritten after every run, so a cut run still
leaves its figures. Before any run it prints the versions it runs on, names any missing
package and how to bring it, and checks in a process of its own that everything imports and
that JAX and PyTorch see a GPU (not with --tiny). If the first jaxkd run fails, every other
would fail alike (most likely a JAX or Flax version this code does not work with): it stops
there, with that run's error. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
sys.path[:0] = [p for p in (REPO, SCRIPTS) if p not in sys.path]

import benchmark  # noqa: E402

from jaxkd.errors import JaxkdError, run_cli  # noqa: E402

PAIRS = (("swin_t", "res18"), ("convnext_t", "deit_t"))
METHODS = ("rsd", "kd", "ofa")
DTYPES = ("bfloat16", "float32")
POPULATION = "population"  # a jaxkd part run with benchmark.py's --population
IMPLEMENTATIONS = ("jaxkd", POPULATION, "torch_compile", "torch_eager")
LABELS = {"jaxkd": "jaxkd (jit)", POPULATION: "jaxkd population", "torch_compile":
          "PyTorch torch.compile", "torch_eager": "PyTorch eager"}
BOTH = (0, 1)  # indices into PAIRS
# (method, dtype, implementations, pairs), most important first: the goals are
# jaxkd against torch.compile in bf16 on both pairs and the MFU of the ViT-family student.
PLAN = (
    ("rsd", "bfloat16", ("jaxkd", "torch_compile", "torch_eager"), BOTH),
    ("rsd", "bfloat16", (POPULATION,), BOTH),
    ("kd", "bfloat16", ("jaxkd", "torch_eager"), BOTH),
    ("ofa", "bfloat16", ("jaxkd",), BOTH),
    ("rsd", "float32", ("jaxkd", "torch_compile", "torch_eager"), BOTH),
    ("kd", "bfloat16", ("torch_compile",), BOTH),
    ("kd", "float32", ("jaxkd", "torch_compile", "torch_eager"), BOTH),
    ("ofa", "float32", ("jaxkd",), BOTH),
)
# --tiny: each implementation, dtype, pair and PyTorch loss once (a CPU test's worth), on
# stand-ins of the same architectures.
TINY_PLAN = (
    ("rsd", "bfloat16", ("jaxkd", "torch_compile"), (0,)),
    ("rsd", "bfloat16", (POPULATION,), (0,)),
    ("kd", "float32", ("jaxkd", "torch_eager"), (1,)),
)
TINY_OVERRIDES = {  # the smallest the four-stage methods accept, 32 px
    "swin_t": {"img_size": 32, "window_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1],
               "num_heads": [1, 1, 1, 1]},
    "res18": {"layers": [1, 1, 1, 1]},
    "convnext_t": {"depths": [1, 1, 1, 1], "dims": [8, 8, 8, 8]},
    "deit_t": {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 4, "num_heads": 1},
}
# Seconds a run is expected to take (process start and compiles included) before one of its
# implementation has been timed on this machine: rough H200 guesses, refined as runs finish.
EXPECTED_S = {"jaxkd": 90, POPULATION: 120, "torch_compile": 180, "torch_eager": 45}
GOAL_SPEEDUP = 1.3  # jaxkd images/s over torch.compile's, bf16, both pairs
GOAL_VIT_MFU = 0.40  # of the bf16 peak, ViT-family students
# Import name -> distribution of what the runs import. Missing pure-Python ones travel as
# wheels (gpu_benchmark.sh --fetch-wheels); the GPU machine of docs/benchmarks.md lacks
# ml-collections only.
REQUIRED = {"jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax",
            "numpy": "numpy", "ml_collections": "ml-collections", "absl": "absl-py",
            "yaml": "PyYAML", "safetensors": "safetensors", "torch": "torch", "timm": "timm"}
OUTPUT = "gpu_benchmark"  # OUT_DIR/gpu_benchmark.json and .md


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True, help="gpu_benchmark.json and .md go here")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for everything, the checks and every compile included")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models, batch 2, 32 px, torch.compile's 'eager' backend; "
                        "no GPU needed (the CPU test)")
    p.add_argument("--batch-size", type=int, default=0, help="0: 128 (tiny: 2)")
    p.add_argument("--image-size", type=int, default=0, help="0: 224 (tiny: 32)")
    p.add_argument("--num-classes", type=int, default=0, help="0: 1000 (tiny: 10)")
    p.add_argument("--warmup", type=int, default=0, help="0: 5 (tiny: 1)")
    p.add_argument("--steps", type=int, default=0, help="timed steps; 0: 20 (tiny: 2)")
    p.add_argument("--population-size", type=int, default=0, help="0: 4 (tiny: 2)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="bf16 peak TFLOP/s of the device; 0: benchmark.py's datasheet figure")
    p.add_argument("--compile-cache", default="",
                   help="JAX persistent compilation cache shared by the runs; default a "
                        "temporary one (no run finds its own step there)")
    p.add_argument("--check", help=argparse.SUPPRESS)  # the environment check's output file
    args = p.parse_args(argv)
    for name, full, tiny in (("batch_size", 128, 2), ("image_size", 224, 32),
                             ("num_classes", 1000, 10), ("warmup", 5, 1), ("steps", 20, 2),
                             ("population_size", 4, 2)):
        if not getattr(args, name):
            setattr(args, name, tiny if args.tiny else full)
    return args


# --- the plan ----------------------------------------------------------------------------
class Job(NamedTuple):
    pair: int  # index into PAIRS
    method: str
    dtype: str
    implementation: str  # one of IMPLEMENTATIONS

    @property
    def group(self) -> tuple:
        """The runs whose MFU uses the same jaxkd FLOP count."""
        return (self.pair, self.method, self.dtype, self.implementation == POPULATION)

    def sort_key(self) -> tuple:
        return (self.pair, METHODS.index(self.method), DTYPES.index(self.dtype),
                IMPLEMENTATIONS.index(self.implementation))


def jobs(plan) -> list[Job]:
    """The plan's runs in its order: within an entry, implementation-major, so that both pairs'
    jaxkd steps come before any PyTorch run."""
    return [Job(pair, method, dtype, impl) for method, dtype, impls, pairs in plan
            for impl in impls for pair in pairs]


def benchmark_argv(job: Job, args) -> list[str]:
    teacher, student = PAIRS[job.pair]
    argv = ["--teacher", teacher, "--student", student, "--method", job.method,
            "--compute-dtype", job.dtype, "--batch-size", str(args.batch_size),
            "--image-size", str(args.image_size), "--num-classes", str(args.num_classes),
            "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.tiny:
        # One thread per part: OpenMP barriers spin against whatever else runs on the CPUs.
        argv += ["--teacher-overrides", json.dumps(TINY_OVERRIDES[teacher]),
                 "--student-overrides", json.dumps(TINY_OVERRIDES[student]),
                 "--torch-compile-backend", "eager",
                 "--cpus", str(min(os.sched_getaffinity(0)))]
    if job.implementation == POPULATION:
        argv += ["--population", str(args.population_size)]
    return argv


def population_available() -> bool:
    """Whether scripts/benchmark.py has --population (students trained together in one step)."""
    return hasattr(benchmark.parse_args([]), "population")


# --- environment -------------------------------------------------------------------------
def versions() -> dict:
    return {"python": platform.python_version(), **benchmark.machine_info()["versions"]}


def pinned_versions() -> dict:
    """The versions constraints.txt pins (what the CI environment tests)."""
    pins = {}
    with open(os.path.join(REPO, "constraints.txt")) as f:
        for line in f:
            name, sep, version = line.strip().partition("==")
            if sep:
                pins[name.lower().replace("_", "-")] = version
    return pins


def missing_packages() -> list[str]:
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]


def how_to_bring(missing) -> str:
    return (f"missing Python packages: {', '.join(missing)}. Install them; where the GPU "
            "machine has no network, bring the pure-Python ones as wheels: on a machine with "
            "pip, `scripts/gpu_benchmark.sh --fetch-wheels [NAME==VERSION ...]` saves them "
            "(by default the pinned ml-collections) into .whl/; copy .whl/ with the "
            "repository and scripts/gpu_benchmark.sh installs them before it starts. jax with "
            "its CUDA plugin, and torch, must be installed on the GPU machine itself.")


def check_environment(out: str) -> None:
    """(In a child process) imports what the runs import and reports the devices JAX and
    PyTorch see, to `out` as JSON."""
    try:
        import jax
        import torch

        from jaxkd import checkpoint, recipes, sharding, step  # noqa: F401 (the runs' imports)
        from jaxkd.convert.timm_import import import_timm

        import_timm()
    except ImportError as e:
        report = {"import_error": f"{type(e).__name__}: {e}", "module": e.name}
    else:
        report = {"jax_backend": jax.default_backend(),
                  "jax_devices": [f"{d.platform}: {d.device_kind}" for d in jax.devices()],
                  "torch_cuda": torch.cuda.is_available(), "torch_cuda_version": torch.version.cuda}
        if report["torch_cuda"]:
            report["torch_device"] = torch.cuda.get_device_name(0)
    with open(out, "w") as f:
        json.dump(report, f)


def _environment(timeout: float) -> dict:
    """check_environment's report, from a process of its own (this one keeps no device)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [REPO, os.environ.get("PYTHONPATH", "")])),
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_CPP_MIN_LOG_LEVEL": "3"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "check.json")
        try:
            proc = subprocess.run([sys.executable, __file__, "--out-dir", tmp, "--check", out],
                                  env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise JaxkdError(f"the environment check (importing jax, torch, timm and jaxkd, "
                             f"asking for devices) took more than {timeout:.0f} s") from None
        if proc.returncode != 0 or not os.path.exists(out):
            tail = benchmark.output_tail(proc.stderr or proc.stdout, 8)
            raise JaxkdError("the environment check failed (exit {}):\n  {}".format(
                proc.returncode, "\n  ".join(tail) or "no output"))
        with open(out) as f:
            report = json.load(f)
    report["stderr_tail"] = benchmark.output_tail(proc.stderr, 8)
    return report


def check(args) -> dict:
    """Versions, packages and devices; raises JaxkdError with what to do when the runs
    cannot go ahead."""
    found, pins = versions(), pinned_versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    differ = [f"{k} {found[k]} (pinned {pins[k]})" for k in ("jax", "jaxlib", "flax", "optax",
                                                                "torch", "timm")
              if k in found and k in pins and found[k].split("+")[0] != pins[k]]
    if differ:
        print("not the versions constraints.txt pins and CI tests: " + ", ".join(differ))
    missing = missing_packages()
    if missing:
        raise JaxkdError(how_to_bring(missing))
    report = _environment(timeout=max(60.0, min(180.0, args.budget / 3)))
    if "import_error" in report:
        raise JaxkdError(f"importing what the runs need failed: {report['import_error']}" +
                         (f"\n{how_to_bring([report['module']])}" if report["module"] else ""))
    print(f"jax backend {report['jax_backend']}: {', '.join(report['jax_devices'])}; "
           f"torch CUDA {report['torch_cuda_version']}: "
           f"{report.get('torch_device', 'no CUDA device')}")
    if not args.tiny:
        said = "".join(f"\n  {line}" for line in report["stderr_tail"])
        if report["jax_backend"] != "gpu":
            raise JaxkdError(
                f"jax has no GPU backend here (it runs on {report['jax_backend']!r}): install "
                f"the CUDA plugin of jaxlib {found.get('jaxlib')} (jax-cuda12-plugin or "
                f"jax-cuda13-plugin), or pass --tiny for the CPU check.{said}")
        if not report["torch_cuda"]:
            raise JaxkdError(f"torch {found.get('torch')} sees no CUDA device: the PyTorch "
                             f"reference would run on the CPU.{said}")
    return report


# --- running the plan --------------------------------------------------------------------
class Run:
    """The plan's runs against a deadline, results rewritten to OUT_DIR after each one.
    `run_part(part, argv, args)` is benchmark.py's: one part in a process of its own."""

    def __init__(self, args, plan, environment: dict, *, run_part=benchmark.run_part,
                 clock=time.monotonic, start: float | None = None):
        self.args, self.environment, self.run_part, self.clock = (args, environment, run_part,
                                                                  clock)
        self.start = clock() if start is None else start
        self.deadline = self.start + args.budget
        self.jobs = jobs(plan)
        self.rows = {job: {"status": "pending", "note": "not started yet"} for job in self.jobs}
        self.groups: dict[tuple, dict] = {}  # Job.group -> benchmark.py's {"parts": ...}
        self.walls: dict[tuple, float] = {}  # (implementation, pair) -> last wall time (s)
        self.peaks: dict[str, dict] = {}  # the peak FLOP/s each MFU figure is relative to
        self.population = population_available()
        self.status = "running"

    def expected_s(self, job: Job) -> float:
        """How long `job` should take: the last run of its implementation and pair, else the
        longest of its implementation, else EXPECTED_S (tiny: no estimate)."""
        if self.args.tiny:
            return 0.0
        same = [wall for (impl, _), wall in self.walls.items() if impl == job.implementation]
        return self.walls.get((job.implementation, job.pair),
                              max(same, default=EXPECTED_S[job.implementation]))

    def execute(self) -> None:
        failure, first_jaxkd = None, True
        for job in self.jobs:
            row = self.rows[job]
            if job.implementation == POPULATION and not self.population:
                row.update(status="not available",
                           note="scripts/benchmark.py has no --population")
                continue
            if self.status != "running":
                row.update(status="not run", note=self.status)
                continue
            left, expected = self.deadline - self.clock(), self.expected_s(job)
            if left < 1 or expected > left:
                row.update(status="not run", note=f"expected to take ~{expected:.0f} s, "
                                                  f"{max(left, 0):.0f} s of the budget left")
                continue
            print(f"[{self.clock() - self.start:4.0f} s] {self.describe(job)} ...", flush=True)
            row.update(status="running", note="started, not finished")
            argv = benchmark_argv(job, self.args)
            part_args = benchmark.parse_args(argv)
            part_args.timeout = int(left)
            began = self.clock()
            result = self.run_part("jaxkd" if job.implementation == POPULATION
                                   else job.implementation, argv, part_args)
            self.walls[(job.implementation, job.pair)] = self.clock() - began
            self.record(job, argv, part_args, result)
            print(f"       {self.summary_line(job)}", flush=True)
            if job.implementation == "jaxkd" and first_jaxkd:
                first_jaxkd = False
                if row["status"] == "failed":
                    self.status, failure = "stopped: the first jaxkd run failed", row
            self.write()
        if failure:
            self.write()
            raise JaxkdError(self.incompatibility(failure))
        self.status = "complete"
        self.write()

    def record(self, job: Job, argv: list[str], part_args, result: dict) -> None:
        row = self.rows[job]
        row.update(wall_s=self.walls[(job.implementation, job.pair)], argv=argv, result=result)
        if "skipped" in result:
            row.update(status="timed out" if result["skipped"].startswith("timed out")
                       else "failed", note=result["skipped"])
            return
        row["status"] = "ok"
        group = self.groups.setdefault(job.group, {"parts": {}})
        group["parts"]["jaxkd" if job.implementation == POPULATION
                       else job.implementation] = result
        peak = benchmark.add_mfu(group, part_args)  # the dtype's datasheet peak
        bf16_args = argparse.Namespace(**{**vars(part_args),
                                          "peak_tflops": self.args.peak_tflops})
        peak_bf16 = benchmark.add_mfu(group, bf16_args, "bfloat16", "mfu_bf16_peak")
        for key, value in ((f"mfu of the {job.dtype} runs", peak), ("mfu_bf16_peak", peak_bf16)):
            if value:
                self.peaks[key] = {"flops_per_s": value[0], "source": value[1]}

    def incompatibility(self, row: dict) -> str:
        found, pins = versions(), pinned_versions()
        where = [line.strip() for line in row["result"].get("stderr_tail", [])
                 if line.strip().startswith("File ")]
        return (f"the jaxkd step failed on jax {found.get('jax')}, jaxlib {found.get('jaxlib')}, "
                f"flax {found.get('flax')}, optax {found.get('optax')} (CI tests jax "
                f"{pins.get('jax')}, flax {pins.get('flax')}, optax {pins.get('optax')}): "
                f"{row['note']}" + (f" ({where[-1]})" if where else "") +
                ". Every jaxkd run would fail alike, so the benchmark stopped here; the run's "
                f"output is in {self.path('json')} (rows[].result.stderr_tail).")

    def describe(self, job: Job) -> str:
        teacher, student = PAIRS[job.pair]
        return f"{teacher} -> {student}, {job.method}, {job.dtype}, {LABELS[job.implementation]}"

    def summary_line(self, job: Job) -> str:
        row = self.rows[job]
        if row["status"] != "ok":
            return f"{row['status']}: {row['note']}"
        r = row["result"]
        return (f"{1e3 * r['step_s']:.1f} ms/step, {r['images_per_s']:.0f} images/s, "
                f"{row['wall_s']:.0f} s in all")

    # --- results ---------------------------------------------------------------------------
    def row_record(self, job: Job) -> dict:
        teacher, student = PAIRS[job.pair]
        row = {"teacher": teacher, "student": student, "method": job.method,
               "dtype": job.dtype, "implementation": job.implementation,
               "run_order": self.jobs.index(job), **self.rows[job]}
        if row["status"] != "ok":
            return row
        r = row["result"]
        row.update({k: r[k] for k in ("step_s", "images_per_s", "compile_s",
                                      "peak_memory_bytes", "peak_memory_source", "mfu",
                                      "mfu_bf16_peak") if k in r})
        single = self.groups.get((job.pair, job.method, job.dtype, False), {})
        jaxkd = single.get("parts", {}).get("jaxkd")
        if job.implementation == POPULATION:
            k = self.args.population_size
            row["population_size"] = k
            row["student_images_per_s"] = k * self.args.batch_size / r["step_s"]
            if jaxkd:  # K students in one step against K single-student steps
                row["population_speedup"] = k * jaxkd["step_s"] / r["step_s"]
        elif job.implementation != "jaxkd" and jaxkd:
            row["jaxkd_speedup"] = r["step_s"] / jaxkd["step_s"]  # jaxkd's images/s over its
        return row

    def goals(self, rows: list[dict]) -> list[dict]:
        """The issue's targets, bf16: jaxkd at least GOAL_SPEEDUP x torch.compile's images/s
        (both pairs, each method with a PyTorch reference), and an MFU of at least
        GOAL_VIT_MFU where the student is of the ViT family (each method)."""
        from jaxkd import models, recipes

        ok = {(r["teacher"], r["student"], r["method"], r["implementation"]): r for r in rows
              if r["status"] == "ok" and r["dtype"] == "bfloat16"}
        wanted = []
        for teacher, student in PAIRS:
            wanted += [(teacher, student, method, "torch_compile", "jaxkd_speedup", GOAL_SPEEDUP,
                        "jaxkd images/s over torch.compile's") for method in
                       benchmark.TORCH_METHODS]
            if models.model_info(recipes.resolve_model(student)).family == "vit":
                wanted += [(teacher, student, method, "jaxkd", "mfu_bf16_peak", GOAL_VIT_MFU,
                            "MFU of the jaxkd step, ViT-family student") for method in METHODS]
        goals = []
        for teacher, student, method, impl, key, target, what in wanted:
            value = ok.get((teacher, student, method, impl), {}).get(key)
            goals.append({"goal": what, "pair": f"{teacher} -> {student}", "method": method,
                          "dtype": "bfloat16", "value": value, "target": target,
                          "met": None if value is None else value >= target})
        return goals

    def results(self) -> dict:
        rows = [self.row_record(job) for job in sorted(self.jobs, key=Job.sort_key)]
        return {"status": self.status, "elapsed_s": self.clock() - self.start,
                "setup": {k: v for k, v in vars(self.args).items() if k != "check"},
                "machine": {**benchmark.machine_info(), "environment": self.environment},
                "versions": versions(), "peak_flops": self.peaks,
                "population_available": self.population, "rows": rows,
                "goals": self.goals(rows)}

    def path(self, ext: str) -> str:
        return os.path.join(self.args.out_dir, f"{OUTPUT}.{ext}")

    def write(self) -> dict:
        results = self.results()
        os.makedirs(self.args.out_dir, exist_ok=True)
        for ext, text in (("json", json.dumps(results, indent=2)),
                          ("md", format_markdown(results))):
            with open(self.path(ext) + ".tmp", "w") as f:
                f.write(text + "\n")
            os.replace(self.path(ext) + ".tmp", self.path(ext))
        return results


# --- markdown ----------------------------------------------------------------------------
def _ratio(value, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.2f}x"


def format_markdown(results: dict) -> str:
    setup, env, v = results["setup"], results["machine"]["environment"], results["versions"]
    device = env.get("torch_device") or ", ".join(env.get("jax_devices", []))
    peak = results["peak_flops"].get("mfu_bf16_peak", {}).get("source", "no FLOP count yet")
    without = sorted(set(METHODS) - set(benchmark.TORCH_METHODS))
    lines = [
        "# jaxkd against PyTorch" + (" (tiny models: a check, not a measurement)"
                                     if setup["tiny"] else ""), "",
        f"{device}; jax {v.get('jax')} / jaxlib {v.get('jaxlib')} (backend "
        f"{env.get('jax_backend')}), flax {v.get('flax')}, optax {v.get('optax')}, torch "
        f"{v.get('torch')} (CUDA {env.get('torch_cuda_version')}), timm {v.get('timm')}, "
        f"Python {v.get('python')}.", "",
        f"Batch {setup['batch_size']}, {setup['image_size']} px, {setup['num_classes']} "
        f"classes, random weights and images; median of {setup['steps']} steps after "
        f"{setup['warmup']} warm-up steps. PyTorch: the same timm models and loss, bf16 autocast "
        "and channels_last on a GPU, TF32 matmuls in float32 as XLA's default. MFU: the jaxkd "
        f"step's XLA FLOP count over the step time and the bf16 peak ({peak}). Speed-up: "
        "jaxkd's images/s over the row's; for a population, its students' images/s over "
        f"one student's. No PyTorch reference for {', '.join(without)}. Status: "
        f"{results['status']}, {results['elapsed_s']:.0f} s of the {setup['budget']:.0f} s "
        "budget.", "",
        "| goal (bf16) | teacher -> student | method | value | target | met |",
        "|---|---|---|---|---|---|"]
    for g in results["goals"]:
        percent = g["target"] < 1
        met = {True: "yes", False: "no", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['pair']} | {g['method']} | "
                     f"{_ratio(g['value'], percent)} | {_ratio(g['target'], percent)} | {met} |")
    lines += ["", "| teacher -> student | method | dtype | implementation | step (ms) | "
              "images/s | compile (s) | peak memory (MiB) | MFU (bf16 peak) | speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        head = (f"| {r['teacher']} -> {r['student']} | {r['method']} | {r['dtype']} | "
                f"{LABELS[r['implementation']]} |")
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r['note']} | | | | | |")
            continue
        compile_s = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
        speedup = r.get("population_speedup", r.get("jaxkd_speedup"))
        lines.append(f"{head} {1e3 * r['step_s']:.1f} | "
                     f"{r.get('student_images_per_s', r['images_per_s']):.0f} | {compile_s} | "
                     f"{r['peak_memory_bytes'] / 2 ** 20:.0f} | "
                     f"{_ratio(r.get('mfu_bf16_peak'), True)} | {_ratio(speedup, False)} |")
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------
def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(args) -> dict:
    start = time.monotonic()
    print(f"gpu_benchmark: {args.budget:.0f} s budget, results in {args.out_dir}", flush=True)
    environment = check(args)
    # SIGTERM ends the part running (benchmark.run_part kills its session) and keeps what
    # was written.
    signal.signal(signal.SIGTERM, _interrupted)
    with tempfile.TemporaryDirectory() as cache:
        # Shared by the runs: a teacher's initialisation repeats, no step does.
        os.environ["JAX_COMPILATION_CACHE_DIR"] = args.compile_cache or cache
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
        bench = Run(args, TINY_PLAN if args.tiny else PLAN, environment, start=start)
        try:
            bench.execute()
        except KeyboardInterrupt as e:
            bench.status = f"interrupted {e}".strip()
            bench.write()
            raise JaxkdError(f"interrupted; what was measured is in {bench.path('json')}"
                             ) from None
    results = bench.results()
    print("\n" + format_markdown(results))
    print(f"\nwrote {bench.path('json')} and {bench.path('md')}")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        check_environment(args.check)
        return 0
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
