r"""Weak scaling of the jaxkd train step over 1, 2, 4, 8 devices, data-parallel and FSDP.

  python scripts/scaling.py --out-dir runs/scaling            # CPU: fake devices
  python scripts/scaling.py --devices 1,2,4,8 --per-device-batch 64 --image-size 224 \
      --teacher swin_t --student res18 --student-overrides '{}' --out-dir runs/scaling_gpu

Every (device count, strategy) runs scripts/benchmark.py's jaxkd part in its own process with
a fixed per-device batch (global batch = devices x per-device batch). On a CPU the devices are
XLA's fake host devices (--xla_force_host_platform_device_count), which all share the
machine's cores: there the table measures the partitioning and collective overhead of each
strategy, not a speed-up. Efficiency = images/s on N devices / (N x images/s on 1 device).
Writes scaling.md (table), scaling.json and scaling.png.

`--members K` measures instead the member axis of a population (jaxkd.population, map
'vmap'): K students on all `--devices` (the largest count), the devices split into
(member groups x data) for each of `--member-devices` (1,2,8: 1 x 8, 2 x 4, 8 x 1), the
global batch fixed at devices x per-device batch. The teacher runs once on the batch split
over every device. Writes members.md and members.json: step time, student images/s (K x
batch / step), parameters + optimiser state per device and compile time.

  python scripts/scaling.py --members 8 --devices 8 --member-devices 1,2,8 \
      --out-dir runs/scaling_members
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

BENCHMARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="res18")
    p.add_argument("--student", default="deit_t")
    p.add_argument("--teacher-overrides", default="{}")
    p.add_argument("--student-overrides", default='{"img_size": 32, "patch_size": 4}')
    p.add_argument("--method", default="rsd")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--strategies", default="data,fsdp")
    p.add_argument("--compute-dtype", default="float32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--cpus", default="", help="passed to benchmark.py (CPU pinning)")
    p.add_argument("--fake-devices", choices=("auto", "yes", "no"), default="auto",
                   help="force fake CPU devices (auto: when no accelerator is found)")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--out-dir", default="runs/scaling")
    p.add_argument("--members", type=int, default=0,
                   help="> 0: the member axis of a population of this many students")
    p.add_argument("--member-devices", default="1,2,8",
                   help="with --members: member groups to split the devices into")
    return p.parse_args(argv)


def _has_accelerator() -> bool:
    probe = "import jax; print(jax.default_backend())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return out.stdout.strip() not in ("cpu", "")


def _benchmark(args, devices: int, strategy: str, fake: bool, extra=()) -> dict:
    """scripts/benchmark.py's jaxkd part on `devices` devices; its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        command = [sys.executable, BENCHMARK, "--skip-torch", "--teacher", args.teacher,
                   "--student", args.student, "--teacher-overrides", args.teacher_overrides,
                   "--student-overrides", args.student_overrides, "--method", args.method,
                   "--image-size", str(args.image_size),
                   "--batch-size", str(devices * args.per_device_batch),
                   "--compute-dtype", args.compute_dtype, "--sharding", strategy,
                   "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--timeout", str(args.timeout), "--json", out, *extra]
        if args.cpus:
            command += ["--cpus", args.cpus]
        env = dict(os.environ)
        if fake:
            command += ["--devices", str(devices)]
        else:  # real accelerators: the first `devices` of them
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(devices)))
        subprocess.run(command, env=env, check=True, timeout=args.timeout + 60)
        with open(out) as f:
            result = json.load(f)
    part = result["parts"]["jaxkd"]
    if "skipped" in part:
        raise RuntimeError(f"{devices} devices, {strategy} {' '.join(extra)}: "
                           f"{part['skipped']}")
    return part


def measure_members(args, devices: int, groups: int, fake: bool) -> dict:
    """A population of args.members students on `devices` devices in `groups` groups."""
    part = _benchmark(args, devices, "data", fake, (
        "--population", str(args.members), "--population-map", "vmap",
        "--member-devices", str(groups)))
    row = part["population"]["rows"][0]
    return {"members": args.members, "member_groups": groups, "data": devices // groups,
            "global_batch": devices * args.per_device_batch, **{k: row[k] for k in (
                "step_s", "student_images_per_s", "compile_s", "state_bytes_per_device")}}


def members_markdown(rows: list[dict], args, fake: bool) -> str:
    lines = [f"Member axis: {args.members} students ({args.teacher} -> {args.student}, "
             f"{args.method}, map vmap), {args.image_size} px, global batch "
             f"{rows[0]['global_batch']}, {args.compute_dtype}, median of {args.steps} steps.",
             ""]
    if fake:
        lines += ["Fake CPU devices share the machine's cores: the table shows how the layout "
                  "changes the state per device and the overhead, not a speed-up.", ""]
    lines += ["| member groups x data | step (ms) | student images/s | state per device (MiB) "
              "| compile (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['member_groups']} x {r['data']} | {1e3 * r['step_s']:.0f} | "
                     f"{r['student_images_per_s']:.1f} | "
                     f"{r['state_bytes_per_device'] / 2**20:.1f} | {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def measure(args, devices: int, strategy: str, fake: bool) -> dict:
    part = _benchmark(args, devices, strategy, fake)
    return {"devices": devices, "strategy": strategy, "global_batch": devices *
            args.per_device_batch, **{k: part[k] for k in (
                "step_s", "step_s_min", "images_per_s", "compile_s", "state_bytes_per_device",
                "flops_per_step", "device_kind")}}


def add_efficiency(rows: list[dict]) -> None:
    """Efficiency against the same strategy on one device; `relative_throughput` (images/s
    over one device's) is what fake CPU devices measure: 1.0 means no overhead."""
    for row in rows:
        base = next(r for r in rows if r["strategy"] == row["strategy"] and r["devices"] == 1)
        row["relative_throughput"] = row["images_per_s"] / base["images_per_s"]
        row["efficiency"] = row["relative_throughput"] / row["devices"]


def markdown(rows: list[dict], args, fake: bool) -> str:
    lines = [f"Weak scaling: {args.teacher} -> {args.student} ({args.method}), "
             f"{args.image_size} px, {args.per_device_batch} images per device, "
             f"{args.compute_dtype}, median of {args.steps} steps.", ""]
    if fake:
        lines += ["Fake CPU devices share the machine's cores: the numbers measure the "
                  "overhead of partitioning and collectives, not a speed-up. With no overhead "
                  "images/s would stay at the 1-device figure (relative throughput 1.0, "
                  "efficiency 1/N).", ""]
    lines += ["| devices | strategy | global batch | step (ms): median, best | images/s "
              "| relative throughput | efficiency | state per device (MiB) | compile (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['strategy']} | {r['global_batch']} | "
                     f"{1e3 * r['step_s']:.0f}, {1e3 * r['step_s_min']:.0f} | "
                     f"{r['images_per_s']:.1f} | "
                     f"{r['relative_throughput']:.2f} | {100 * r['efficiency']:.0f}% | "
                     f"{r['state_bytes_per_device'] / 2**20:.1f} | {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, fake: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for strategy in sorted({r["strategy"] for r in rows}):
        mine = [r for r in rows if r["strategy"] == strategy]
        n = [r["devices"] for r in mine]
        axes[0].plot(n, [r["images_per_s"] for r in mine], marker="o", label=strategy)
        axes[1].plot(n, [100 * r["efficiency"] for r in mine], marker="o", label=strategy)
        axes[2].plot(n, [r["state_bytes_per_device"] / 2**20 for r in mine], marker="o",
                     label=strategy)
    for ax, label in zip(axes, ("images/s", "weak-scaling efficiency (%)",
                                "params + optimiser state per device (MiB)")):
        ax.set_xlabel("devices" + (" (fake CPU devices, shared cores)" if fake else ""))
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["devices"] for r in rows}),
                      labels=[str(d) for d in sorted({r["devices"] for r in rows})])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    fake = args.fake_devices == "yes" or (args.fake_devices == "auto" and
                                          not _has_accelerator())
    os.makedirs(args.out_dir, exist_ok=True)
    if args.members:
        devices = max(map(int, args.devices.split(",")))
        rows = []
        for groups in map(int, args.member_devices.split(",")):
            print(f"{args.members} members on {groups} x {devices // groups} devices ...",
                  flush=True)
            rows.append(measure_members(args, devices, groups, fake))
        table = members_markdown(rows, args, fake)
        print("\n" + table)
        with open(os.path.join(args.out_dir, "members.md"), "w") as f:
            f.write(table)
        with open(os.path.join(args.out_dir, "members.json"), "w") as f:
            json.dump({"setup": vars(args), "fake_cpu_devices": fake, "rows": rows}, f,
                      indent=2)
        print(f"wrote {args.out_dir}/members.md, members.json")
        return
    rows = []
    for strategy in args.strategies.split(","):
        for devices in map(int, args.devices.split(",")):
            print(f"{devices} devices, {strategy} ...", flush=True)
            rows.append(measure(args, devices, strategy, fake))
    add_efficiency(rows)
    table = markdown(rows, args, fake)
    print("\n" + table)
    with open(os.path.join(args.out_dir, "scaling.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out_dir, "scaling.json"), "w") as f:
        json.dump({"setup": vars(args), "fake_cpu_devices": fake, "rows": rows}, f, indent=2)
    plot(rows, os.path.join(args.out_dir, "scaling.png"), fake)
    print(f"wrote {args.out_dir}/scaling.md, scaling.json, scaling.png")


if __name__ == "__main__":
    main()
