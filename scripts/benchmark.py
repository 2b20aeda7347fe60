r"""Throughput of the jaxkd distillation train step against a PyTorch/timm reference.

  python scripts/benchmark.py --teacher swin_t --student res18 --method rsd \
      --batch-size 8 --image-size 224 --json runs/bench/swin_t-res18.json

Measures, for one teacher/student pair, method, batch size and image size (random weights,
random images): the step time (median of --steps timed steps after --warmup), images/s,
compile time, peak memory and MFU of
  * jaxkd: the jitted train step (jaxkd.step) (teacher forward, student forward/backward, method
    loss, optimiser update), FLOPs from XLA's cost analysis of the compiled step;
  * PyTorch eager and torch.compile: the same timm models and the same loss (RSD: CE + lambda *
    RSD with an AAD projector; KD: CE + T^2 KL), SGD with momentum; AMP bf16 + channels_last
    on GPU when --compute-dtype bfloat16, TF32 matmuls (as XLA's default) when float32. The
    same FLOP count is used for its MFU.
Each part runs in its own process (clean peak-memory figures, no thread pools shared between
frameworks). MFU = FLOPs per step / step time / peak FLOP/s: --peak-tflops, else a known
per-device figure (NVIDIA datasheet, dense), else for CPUs cores x clock x FLOPs per cycle
(AVX2 FMA: 32 float32 FLOPs per cycle, AVX-512: 64), always printed with the result.
`--input-pipeline` also measures the tf.data pipeline's own images/s (jaxkd.data) at the same
batch and image size, to show whether it can feed the step. `--breakdown` times the teacher
forward and the student forward/backward on their own (the rest is the optimiser update).

`--population 2,4,8` also times, in the same process, one population step of K students
(jaxkd.population, seeds 0..K-1, `--population-map`) against K single-student steps of the
same pair, in rounds (a single step, the teacher forward alone, a population step) so that
the load of a shared machine drifts alike for all three, and prints for each K a line
`population speed-up (K=4): 1.43x (ideal 1.45x)`: K times the single step over the
population step, medians over the rounds. The ideal is K (T + S) / (T + K S): T the teacher
forward alone, S the rest of a single step (the single step minus T).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

SCRIPT = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(SCRIPT))
PARTS = ("jaxkd", "torch_eager", "torch_compile", "input_pipeline")
TORCH_METHODS = ("rsd", "kd")  # the methods the PyTorch reference implements
# Whose versions the results record (distribution names).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "ml-collections", "numpy", "torch", "timm",
            "tensorflow-cpu")
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4

# Dense peak TFLOP/s per device from NVIDIA's datasheets (SXM parts). The float32 figure is
# the TF32 tensor-core peak: XLA's default GPU precision runs float32 matmuls in TF32.
GPU_PEAK_TFLOPS = {"H200": {"bfloat16": 989.4, "float32": 494.7},
                   "H100": {"bfloat16": 989.4, "float32": 494.7},
                   "A100": {"bfloat16": 312.0, "float32": 156.0}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="swin_t", help="timm name or jaxkd alias")
    p.add_argument("--student", default="res18", help="timm name or jaxkd alias")
    p.add_argument("--teacher-overrides", default="{}", help="JSON timm keyword arguments")
    p.add_argument("--student-overrides", default="{}", help="JSON timm keyword arguments")
    p.add_argument("--method", default="rsd", help="jaxkd method (torch reference: rsd, kd)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="global batch")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--sharding", default="data", choices=("data", "fsdp"))
    p.add_argument("--devices", type=int, default=0,
                   help="fake CPU devices for the jaxkd part (XLA_FLAGS); 0: as found")
    p.add_argument("--cpus", default="",
                   help="comma-separated CPU ids every part is pinned to (sched_setaffinity); "
                        "XLA, OpenMP and MKL then size their thread pools to them")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak TFLOP/s of one device for MFU; 0: known figure or CPU estimate")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--no-torch-compile", action="store_true")
    p.add_argument("--torch-compile-backend", default="inductor",
                   help="torch.compile backend; 'eager' only traces (a cheap check on CPU)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the teacher forward and student forward/backward alone")
    p.add_argument("--profile", action="store_true",
                   help="trace the jaxkd step (jax.profiler) and sum op time by part and kind")
    p.add_argument("--population", default="",
                   help="comma-separated member counts K: time a population step of K "
                        "students against K single steps")
    p.add_argument("--population-map", default="loop", choices=("loop", "vmap"),
                   help="how the population step goes over its members")
    p.add_argument("--member-devices", type=int, default=1,
                   help="population: groups of devices the members are spread over (a "
                        "member x data mesh; needs --population-map vmap)")
    p.add_argument("--input-pipeline", action="store_true")
    p.add_argument("--dataset", default="sklearn_digits", help="for --input-pipeline")
    p.add_argument("--data-dir", default="", help="TFDS data_dir for --input-pipeline")
    p.add_argument("--pipeline-batches", type=int, default=30)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per part")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--part-output", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- machine and peak FLOP/s -------------------------------------------------------------
def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cpu_flops_per_cycle() -> tuple[int, str]:
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if "avx512f" in flags:
        return 64, "AVX-512 FMA, 2 units x 16 float32 x 2"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2 FMA, 2 units x 8 float32 x 2"
    return 8, "SSE, 4 float32 x 2"


def _cpu_ghz() -> float:
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1e6
    except OSError:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return max(mhz) / 1e3 if mhz else 2.0


def peak_flops(platform_name: str, device_kind: str, dtype: str, override_tflops: float,
               cores: float) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained); a CPU device has `cores` cores (a
    fraction when fake devices share them)."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops} TFLOP/s given by --peak-tflops"
    if platform_name == "gpu":
        for name, peaks in GPU_PEAK_TFLOPS.items():
            if name in device_kind:
                return peaks[dtype] * 1e12, (f"{peaks[dtype]} TFLOP/s: {name} SXM dense "
                                             f"{'bf16' if dtype == 'bfloat16' else 'TF32'}")
        return 0.0, f"unknown GPU {device_kind!r}: give --peak-tflops"
    per_cycle, how = _cpu_flops_per_cycle()
    ghz = _cpu_ghz()
    flops = cores * ghz * 1e9 * per_cycle
    return flops, (f"{flops / 1e9:.0f} GFLOP/s assumed: {cores:g} cores x {ghz:.2f} GHz x "
                   f"{per_cycle} FLOPs/cycle ({how}); bf16 gets no more on this CPU")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _step_times(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _summary(times, batch_size) -> dict:
    median = statistics.median(times)
    return {"step_s": median, "step_s_min": min(times), "step_s_all": times,
            "images_per_s": batch_size / median}


# --- jaxkd -------------------------------------------------------------------------------
def _config(args):
    from jaxkd import distill, recipes

    config = recipes.base_config()
    config.dataset.image_size = args.image_size
    config.student.name = recipes.resolve_model(args.student)
    config.student.overrides = json.loads(args.student_overrides)
    if distill.method_requirements(args.method).uses_teacher:
        config.teacher.name = recipes.resolve_model(args.teacher)
        config.teacher.overrides = json.loads(args.teacher_overrides)
    config.method = distill.method_config(args.method)
    config.optimizer.update(name="sgd", lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                            schedule="constant")
    config.batch_size = args.batch_size
    config.compute_dtype = args.compute_dtype
    config.sharding = config.teacher_sharding = args.sharding
    config.progress_bar = False
    return config


def _random_teacher_export(config, num_classes, image_size, out_dir):
    import jax
    import jax.numpy as jnp

    from jaxkd import checkpoint, models

    overrides = dict(config.teacher.overrides)
    module = models.create_model(config.teacher.name, num_classes=num_classes, **overrides)
    init = jax.jit(lambda key: module.init(key, jnp.zeros((1, image_size, image_size, 3)),
                                           train=False))
    checkpoint.save_model(out_dir, jax.device_get(init(jax.random.PRNGKey(1))),
                          model_name=config.teacher.name, num_classes=num_classes,
                          overrides=json.loads(json.dumps(overrides)))
    return out_dir


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


def _xla_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
               stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _per_device_bytes(tree) -> int:
    import jax

    return int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)))


def run_jaxkd(args) -> dict:
    import jax
    import numpy as np

    from jaxkd import sharding, step as jaxkd_step

    config = _config(args)
    mesh = sharding.data_mesh()
    teacher_dir = tempfile.TemporaryDirectory()  # kept for the population's builds
    if config.teacher.name:
        config.teacher.checkpoint = _random_teacher_export(config, args.num_classes,
                                                           args.image_size, teacher_dir.name)
    setup, teacher_vars = jaxkd_step.build(config, args.num_classes, 1000, 1000, mesh)
    state = jaxkd_step.init_state(setup, 0)
    rng = np.random.RandomState(0)
    n, size = args.batch_size, args.image_size
    batch = sharding.global_batch(
        {"image": rng.rand(n, size, size, 3).astype(np.float32),
         "label": rng.randint(0, args.num_classes, n).astype(np.int32),
         "index": np.arange(n, dtype=np.int32)}, mesh)
    start = time.perf_counter()
    compiled = jaxkd_step.jit_train_step(setup).lower(state, teacher_vars, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], teacher_vars, batch)
        jax.block_until_ready((holder["state"], metrics))

    _step_times(step, args.warmup)
    result = {**_summary(_step_times(step, args.steps), n), "compile_s": compile_s,
              "flops_per_step": _flops(compiled), "xla_step_bytes": _xla_bytes(compiled),
              "state_bytes_per_device": _per_device_bytes(
                  (holder["state"].params, holder["state"].opt_state)),
              "num_devices": mesh.size}
    device = jax.devices()[0]
    stats = device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        result["peak_memory_bytes"], result["peak_memory_source"] = (
            int(stats["peak_bytes_in_use"]), "device memory_stats peak_bytes_in_use")
    else:
        result["peak_memory_bytes"], result["peak_memory_source"] = (
            peak_rss_bytes(), "process peak RSS (CPU: no device memory stats)")
    result["device_kind"], result["platform"] = device.device_kind, device.platform
    if args.breakdown:
        result["breakdown"] = _breakdown(setup, teacher_vars, holder["state"], batch, args)
    if args.population:
        result["population"] = _population(config, setup, teacher_vars, batch, args, step)
    teacher_dir.cleanup()
    if args.profile:
        result["profile"] = _profile(compiled, step, setup, args.steps)
    return result


def _wall_and_cpu(fn) -> tuple[float, float]:
    """(wall seconds, this process's user + system CPU seconds) of one call."""
    def cpu():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    wall, cpu_start = time.perf_counter(), cpu()
    fn()
    return time.perf_counter() - wall, cpu() - cpu_start


def ideal_speedup(members: int, teacher_s: float, single_step_s: float) -> float:
    """K (T + S) / (T + K S): K single steps against a step that runs the teacher (T) once
    and the rest of a step (S = single step - T) K times."""
    student_s = max(single_step_s - teacher_s, 0.0)
    return members * single_step_s / (teacher_s + members * student_s)


def _population(config, setup, teacher_variables, batch, args, single_step) -> dict:
    """Population steps of K members (seeds 0..K-1) against K single steps. On a shared
    machine the load drifts, so each of --steps rounds times one single step
    (`single_step()`), the teacher forward alone and one population step back to back; the
    medians over the rounds give the speed-up and its ideal."""
    import functools

    import jax

    from jaxkd import population, recipes, sharding, step as jaxkd_step

    teacher_forward = lambda: None  # noqa: E731  (no teacher: T = 0)
    if setup.teacher is not None:
        forward = jax.jit(functools.partial(jaxkd_step.teacher_forward, setup)).lower(
            teacher_variables, batch["image"]).compile()
        teacher_forward = lambda: jax.block_until_ready(  # noqa: E731
            forward(teacher_variables, batch["image"]))
    rows = []
    for k in map(int, args.population.split(",")):
        pconfig = recipes.population(config.copy_and_resolve_references(),
                                     seeds=tuple(range(k)), map=args.population_map,
                                     member_devices=args.member_devices)
        mesh = population.mesh(pconfig)
        psetup, pteacher = population.build(pconfig, args.num_classes, 1000, 1000, mesh)
        pbatch = sharding.global_batch(jax.device_get(batch), mesh)
        holder = {"state": population.init_state(psetup)}
        start = time.perf_counter()
        compiled = population.jit_train_step(psetup).lower(holder["state"], pteacher,
                                                           pbatch).compile()
        compile_s = time.perf_counter() - start

        def population_step():
            holder["state"], metrics = compiled(holder["state"], pteacher, pbatch)
            jax.block_until_ready((holder["state"], metrics))

        _step_times(population_step, args.warmup)
        rounds = [[_wall_and_cpu(f) for f in (single_step, teacher_forward, population_step)]
                  for _ in range(args.steps)]
        (single_s, teacher_s, step_s), (single_cpu, teacher_cpu, step_cpu) = (
            [statistics.median(r[i][j] for r in rounds) for i in range(3)] for j in range(2))
        rows.append({"members": k, "map": args.population_map, "mesh": dict(mesh.shape),
                     "step_s": step_s, "student_images_per_s": k * args.batch_size / step_s,
                     "rounds_single_teacher_population_wall_cpu_s": rounds,
                     "compile_s": compile_s,
                     "single_step_s": single_s, "teacher_forward_s": teacher_s,
                     "single_steps_s": k * single_s, "speedup": k * single_s / step_s,
                     "ideal_speedup": ideal_speedup(k, teacher_s, single_s),
                     # the same from the process's CPU time, which other jobs disturb less
                     "cpu_s": {"single_step": single_cpu, "teacher_forward": teacher_cpu,
                               "population_step": step_cpu},
                     "cpu_speedup": k * single_cpu / step_cpu,
                     "cpu_ideal_speedup": ideal_speedup(k, teacher_cpu, single_cpu),
                     "state_bytes_per_device": _per_device_bytes(
                         (holder["state"].members.params, holder["state"].members.opt_state))})
        del holder, compiled
    return {"rows": rows}


def population_lines(population: dict) -> list[str]:
    """The population table and one speed-up line per K."""
    lines = ["\npopulation (medians over rounds of a single step, the teacher forward alone "
             "and a population step):",
             "| K | map | population step (ms) | single step (ms) | teacher forward (ms) | "
             "speed-up | ideal | of ideal | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in population["rows"]:
        lines.append(f"| {r['members']} | {r['map']} | {1e3 * r['step_s']:.0f} | "
                     f"{1e3 * r['single_step_s']:.0f} | {1e3 * r['teacher_forward_s']:.0f} | "
                     f"{r['speedup']:.2f}x | "
                     f"{r['ideal_speedup']:.2f}x | {100 * r['speedup'] / r['ideal_speedup']:.0f}% "
                     f"| {r['compile_s']:.1f} |")
    lines += [f"population speed-up (K={r['members']}): {r['speedup']:.2f}x "
              f"(ideal {r['ideal_speedup']:.2f}x)" for r in population["rows"]]
    lines += [f"  by CPU time (K={r['members']}): {r['cpu_speedup']:.2f}x (ideal "
              f"{r['cpu_ideal_speedup']:.2f}x)" for r in population["rows"] if "cpu_speedup" in r]
    return lines


_HLO_OP_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')


def _part_of(op_name: str, student: str, teacher: str, method: str) -> str:
    """Which part of the step an HLO op belongs to, from its JAX name stack."""
    for module, part in ((student, "student"), (method, "method loss")):
        if f"transpose(jvp({module}))" in op_name:
            return f"{part} backward"
        if f"jvp({module})" in op_name:
            return f"{part} forward"
    if teacher and f"/{teacher}/" in op_name + "/":
        return "teacher forward"
    return "optimizer update and the rest"


def _profile(compiled, step, setup, steps: int) -> dict:
    """Traces `steps` steps with jax.profiler and sums the time of each HLO op (the trace's
    per-op events) by part of the step and by op kind (the HLO name without its number)."""
    import collections
    import glob
    import gzip

    import jax

    op_names = dict(m.groups() for m in map(_HLO_OP_NAME.match, compiled.as_text().splitlines())
                    if m)
    names = [type(setup.student.module).__name__,
             type(setup.teacher.module).__name__ if setup.teacher else "",
             type(setup.method).__name__]
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(steps):
            step()
        jax.profiler.stop_trace()
        trace_file = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                               recursive=True)[0]
        with gzip.open(trace_file) as f:
            events = json.load(f)["traceEvents"]
    by_part, by_kind, by_op = (collections.Counter() for _ in range(3))
    for event in events:
        if event.get("ph") == "X" and event.get("name") in op_names:
            seconds = event["dur"] / 1e6 / steps
            op_name = op_names[event["name"]]
            by_part[_part_of(op_name, names[0], names[1], names[2])] += seconds
            by_kind[event["name"].rsplit(".", 1)[0]] += seconds
            # One entry per op of a block type: the block index and jit prefix dropped.
            by_op[re.sub(r"_\d+(?=/)", "_*", op_name.split("/", 1)[-1])] += seconds
    return {"attributed_seconds_per_step": sum(by_part.values()),
            "seconds_per_step_by_part": dict(by_part.most_common()),
            "seconds_per_step_by_op_kind": dict(by_kind.most_common(12)),
            "seconds_per_step_by_op": dict(by_op.most_common(15)),
            "modules": {"student": names[0], "teacher": names[1], "method": names[2]}}


def _breakdown(setup, teacher_variables, state, batch, args) -> dict:
    """Teacher forward and student forward/backward (with the method's loss) compiled and
    timed alone; the full step's remainder is the optimiser update and what XLA fuses."""
    import functools

    import jax

    from jaxkd import distill, step as jaxkd_step

    def student_grads(params, teacher_out, teacher_variables):
        teacher = None
        if teacher_out is not None:  # the computed outputs, plus the re-run PAT's prompts use
            rerun = (functools.partial(jaxkd_step.teacher_forward, setup, teacher_variables,
                                       batch["image"])
                     if setup.requires.teacher == "rerun" else None)
            teacher = distill.TeacherView(*teacher_out, rerun=rerun)
        return jax.grad(lambda p: jaxkd_step.loss(setup, p, state.model_state, teacher, batch,
                                                  jax.random.PRNGKey(0))[0])(params)

    parts = {}
    teacher_out = None
    if setup.teacher is not None:
        forward = functools.partial(jaxkd_step.teacher_forward, setup)
        teacher = jax.jit(forward).lower(teacher_variables, batch["image"]).compile()
        parts["teacher_forward"] = (teacher, (teacher_variables, batch["image"]))
        teacher_out = teacher(teacher_variables, batch["image"])
    inputs = (state.params, teacher_out, teacher_variables)
    grads = jax.jit(student_grads).lower(*inputs).compile()
    parts["student_forward_backward"] = (grads, inputs)
    result = {}
    for name, (compiled, inputs) in parts.items():
        run = lambda: jax.block_until_ready(compiled(*inputs))  # noqa: E731
        _step_times(run, args.warmup)
        result[name] = {"step_s": statistics.median(_step_times(run, args.steps)),
                        "flops": _flops(compiled)}
    return result


# --- PyTorch -----------------------------------------------------------------------------
def _torch_losses(method: str, teacher_dim: int, student_dim: int):
    """(extra trainable module, loss(s_logits, s_emb, t_logits, t_emb, labels)) of `method`
    with jaxkd's defaults."""
    import torch
    import torch.nn.functional as F

    from jaxkd import distill

    defaults = distill.method_entry(method).config_fields()
    if method == "rsd":
        hidden = int(round(defaults["expansion"] * student_dim))
        aad = torch.nn.Sequential(torch.nn.Linear(student_dim, hidden, bias=False),
                                  torch.nn.BatchNorm1d(hidden, eps=1e-5, momentum=0.1),
                                  torch.nn.GELU(),
                                  torch.nn.Linear(hidden, teacher_dim, bias=False))

        def standardise(x):
            centred = x - x.mean(0)
            return centred / (centred.pow(2).mean(0).sqrt() + 1e-5)

        def loss(s_logits, s_emb, t_logits, t_emb, labels):
            ce = F.cross_entropy(s_logits.float(), labels)
            with torch.autocast(s_emb.device.type, enabled=False):  # AAD and RSD in float32
                zs, zt = standardise(aad(s_emb.float())), standardise(t_emb.float())
                c = zt.T @ zs / zs.shape[0]
                on = (1 - torch.diagonal(c)).pow(2).sum()
                off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
                rsd = on + defaults["kappa"] * off
            return ce + defaults["rsd_weight"] * rsd

        return aad, loss
    if method == "kd":
        temperature = defaults["temperature"]

        def loss(s_logits, s_emb, t_logits, t_emb, labels):
            ce = F.cross_entropy(s_logits.float(), labels)
            kl = F.kl_div(F.log_softmax(s_logits.float() / temperature, -1),
                          F.log_softmax(t_logits.float() / temperature, -1), log_target=True,
                          reduction="batchmean")
            return defaults["ce_weight"] * ce + defaults["kd_weight"] * temperature ** 2 * kl

        return None, loss
    raise NotImplementedError(f"no PyTorch reference for method {method!r} "
                              f"({', '.join(TORCH_METHODS)} only)")


def run_torch(args, compiled: bool) -> dict:
    import torch

    from jaxkd import models, recipes
    from jaxkd.convert.timm_import import import_timm

    timm = import_timm()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda" and args.compute_dtype == "bfloat16"
    layout = torch.channels_last if amp else torch.contiguous_format
    if device.type == "cuda" and args.compute_dtype == "float32":
        # JAX's default precision runs float32 matmuls in TF32 on GPUs that have it (and
        # cuDNN convolutions already do): the same here, so float32 compares like with like.
        torch.set_float32_matmul_precision("high")
    names = recipes.resolve_model(args.teacher), recipes.resolve_model(args.student)
    teacher = timm.create_model(names[0], pretrained=False, num_classes=args.num_classes,
                                **json.loads(args.teacher_overrides))
    student = timm.create_model(names[1], pretrained=False, num_classes=args.num_classes,
                                **json.loads(args.student_overrides))
    teacher = teacher.to(device, memory_format=layout).eval().requires_grad_(False)
    student = student.to(device, memory_format=layout).train()
    extra, method_loss = _torch_losses(args.method, teacher.num_features,
                                       student.num_features)
    params = list(student.parameters())
    if extra is not None:
        extra = extra.to(device).train()
        params += list(extra.parameters())
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    mean = torch.tensor(models.model_info(names[1]).mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(models.model_info(names[1]).std, device=device).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    n, size = args.batch_size, args.image_size
    images = torch.rand(n, 3, size, size, generator=gen).to(device, memory_format=layout)
    labels = torch.randint(0, args.num_classes, (n,), generator=gen).to(device)

    def forward(model, x):
        embedding = model.forward_head(model.forward_features(x), pre_logits=True)
        return model.get_classifier()(embedding), embedding

    def loss_fn(images, labels):
        x = (images - mean) / std
        with torch.no_grad():
            t_logits, t_emb = forward(teacher, x)
        s_logits, s_emb = forward(student, x)
        return method_loss(s_logits, s_emb, t_logits, t_emb, labels)

    if compiled:
        loss_fn = torch.compile(loss_fn, backend=args.torch_compile_backend)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(images, labels)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    _step_times(step, max(args.warmup - 1, 0))
    result = {**_summary(_step_times(step, args.steps), n), "first_step_s": first_s,
              "amp_bf16": amp, "channels_last": amp, "threads": torch.get_num_threads(),
              "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if compiled:
        result["compile_s"] = first_s - result["step_s"]
    if args.breakdown and not compiled:
        x = (images - mean) / std
        with torch.no_grad():
            t_logits, t_emb = forward(teacher, x)

        def teacher_forward():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=amp):
                forward(teacher, x)
            if device.type == "cuda":
                torch.cuda.synchronize()

        def student_forward_backward():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                s_logits, s_emb = forward(student, x)
                loss = method_loss(s_logits, s_emb, t_logits, t_emb, labels)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        result["breakdown"] = {}
        for name, run in (("teacher_forward", teacher_forward),
                          ("student_forward_backward", student_forward_backward)):
            _step_times(run, args.warmup)
            result["breakdown"][name] = {
                "step_s": statistics.median(_step_times(run, args.steps))}
    if device.type == "cuda":
        result["peak_memory_bytes"], result["peak_memory_source"] = (
            int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated")
    else:
        result["peak_memory_bytes"], result["peak_memory_source"] = (
            peak_rss_bytes(), "process peak RSS (CPU)")
    return result


# --- input pipeline ----------------------------------------------------------------------
def run_input_pipeline(args) -> dict:
    from jaxkd import data, recipes

    dataset = data.open_dataset(args.dataset, args.data_dir or None)
    augment = data.AugmentConfig.from_config(recipes.base_config().augment)
    sampler = data.RandomSampler(data.TrainData(global_batch_size=args.batch_size,
                                                image_size=args.image_size, seed=0,
                                                augment=augment))
    batches = sampler.batches(dataset)
    for _ in range(3):  # pipeline start and shuffle buffer
        next(batches)
    start = time.perf_counter()
    for _ in range(args.pipeline_batches):
        next(batches)
    elapsed = time.perf_counter() - start
    return {"dataset": args.dataset, "batches": args.pipeline_batches,
            "images_per_s": args.pipeline_batches * args.batch_size / elapsed,
            "augment": "base_config().augment (random resized crop + flip)"}


# --- orchestration -----------------------------------------------------------------------
def _cpus(args) -> set[int]:
    return {int(c) for c in args.cpus.split(",")} if args.cpus else os.sched_getaffinity(0)


def run_part(part: str, argv: list[str], args) -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cpus = _cpus(args)
    # OpenMP (torch) spins at barriers: more threads than free cores is very slow.
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(len(cpus))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
    if part == "jaxkd" and args.devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={args.devices}").strip()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "part.json")
        command = [sys.executable, SCRIPT, *argv, "--part", part, "--part-output", out]
        # A session of its own, so that a part is ended with every process it started
        # (torch.compile's compile workers), also when it times out or we are interrupted.
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        try:
            stdout, stderr = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _end_session(proc)
            stdout, stderr = proc.communicate()
            return {"skipped": f"timed out after {args.timeout} s",
                    "stderr_tail": output_tail(stderr or stdout)}
        finally:
            _end_session(proc)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = output_tail(stderr or stdout)
            return {"skipped": f"failed (exit {proc.returncode}): "
                               f"{(tail[-1:] or ['no output'])[0][:300]}",
                    "stderr_tail": tail}
        with open(out) as f:
            return json.load(f)


def _end_session(proc) -> None:
    """Kills the processes of `proc`'s session (it may have ended; they may not have)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def output_tail(output: str, lines: int = 25) -> list[str]:
    return output.strip().splitlines()[-lines:]


def _part_main(args) -> None:
    if args.part == "jaxkd":
        result = run_jaxkd(args)
    elif args.part == "input_pipeline":
        result = run_input_pipeline(args)
    else:
        result = run_torch(args, compiled=args.part == "torch_compile")
    with open(args.part_output, "w") as f:
        json.dump(result, f)


def machine_info() -> dict:
    import importlib.metadata as md

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "load_average": os.getloadavg(), "versions": versions}


def _mib(n) -> str:
    return f"{n / 2 ** 20:.0f} MiB" if n else "-"


def format_table(results: dict) -> str:
    jaxkd = results["parts"]["jaxkd"]
    rows = ["| implementation | step (ms, median) | images/s | compile (s) | peak memory | "
            "MFU | jaxkd speed-up |", "|---|---|---|---|---|---|---|"]
    for part, label in (("jaxkd", "jaxkd (jit)"), ("torch_eager", "PyTorch eager"),
                        ("torch_compile", "PyTorch torch.compile")):
        r = results["parts"].get(part)
        if r is None:
            continue
        if "skipped" in r:
            rows.append(f"| {label} | skipped: {r['skipped']} | | | | | |")
            continue
        speedup = r["step_s"] / jaxkd["step_s"] if "step_s" in jaxkd else float("nan")
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        rows.append(f"| {label} | {1e3 * r['step_s']:.1f} | {r['images_per_s']:.1f} | "
                    f"{compile_s} | {_mib(r.get('peak_memory_bytes', 0))} | "
                    f"{100 * r.get('mfu', 0):.1f}% | {speedup:.2f}x |")
    pipeline = results["parts"].get("input_pipeline")
    if pipeline and "images_per_s" in pipeline:
        rows.append(f"\ninput pipeline ({pipeline['dataset']}, {pipeline['augment']}): "
                    f"{pipeline['images_per_s']:.0f} images/s")
    return "\n".join(rows)


def add_mfu(results: dict, args, dtype: str = "", key: str = "mfu"):
    """Sets `key` of every timed part of `results` to its MFU: the jaxkd step's FLOPs over
    (step time x peak FLOP/s of one device for `dtype`, default the compute dtype). Returns
    (peak, how it was obtained), or None without a jaxkd FLOP count."""
    jaxkd = results["parts"].get("jaxkd", {})
    if "flops_per_step" not in jaxkd:
        return None
    # XLA counts one device's share of the FLOPs; with N (fake) devices each gets 1/N of
    # the peak, so for torch (the whole machine, all the FLOPs) the ratio is the same.
    peak, how = peak_flops(jaxkd["platform"], jaxkd["device_kind"], dtype or args.compute_dtype,
                           args.peak_tflops, len(_cpus(args)) / jaxkd["num_devices"])
    for part in ("jaxkd", "torch_eager", "torch_compile"):
        r = results["parts"].get(part, {})
        if "step_s" in r and peak:
            r[key] = jaxkd["flops_per_step"] / (r["step_s"] * peak)
    return peak, how


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.part:
        return _part_main(args)
    parts = ["jaxkd"]
    if not args.skip_torch:
        if args.method in TORCH_METHODS:
            parts.append("torch_eager")
            if not args.no_torch_compile:
                parts.append("torch_compile")
        else:
            print(f"PyTorch reference skipped: it implements {', '.join(TORCH_METHODS)}, "
                  f"not {args.method!r}")
    if args.input_pipeline:
        parts.append("input_pipeline")
    results = {"setup": {k: v for k, v in vars(args).items() if not k.startswith("part")},
               "machine": machine_info(), "cpus": sorted(_cpus(args)), "parts": {}}
    for part in parts:
        print(f"running {part} ...", flush=True)
        results["parts"][part] = run_part(part, argv, args)
        # Other processes share the CPUs: the load when each part ended, to read its times by.
        results["parts"][part]["load_average_after"] = os.getloadavg()
        if "skipped" in results["parts"][part]:
            print(f"  {part} skipped: {results['parts'][part]['skipped']}")
    peak = add_mfu(results, args)
    if peak:
        results["peak_flops_per_device"], results["peak_flops_source"] = peak
    print(f"\n{args.teacher} -> {args.student}, {args.method}, batch {args.batch_size}, "
          f"{args.image_size} px, {args.compute_dtype}, sharding {args.sharding}")
    if "peak_flops_source" in results:
        print(f"MFU peak: {results['peak_flops_source']}")
    print(format_table(results))
    if "population" in results["parts"]["jaxkd"]:
        print("\n".join(population_lines(results["parts"]["jaxkd"]["population"])))
    if args.json:
        from jaxkd.metric_writer import write_json

        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
