r"""Times each depthwise-conv lowering of jaxkd.models.layers against PyTorch, on this backend.

  python scripts/depthwise_benchmark.py --cpus 0,1 --json docs/benchmarks/depthwise_cpu.json

For the depthwise convs of ConvNeXt-T (7x7), MobileNetV2 (3x3, stride 1 and 2) and OFA's
branches (3x3 stride 2) at batch 8 and 224 px: the median time of the jitted forward and of the
forward + backward (gradients for the input and the kernel) of every lowering in
`layers.LOWERINGS`, and of torch.nn.functional.conv2d(groups=C) eager (NCHW, as timm runs it).
The lowering `layers.DEPTHWISE_LOWERING` picks for a backend should be the fastest one here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from jaxkd.errors import run_cli
from jaxkd.metric_writer import write_json

# (name, [B, H, W, C], kernel, stride): batch 8 at 224 px.
CASES = (
    ("convnext_t stage 1 dw7x7", (8, 56, 56, 96), 7, 1),
    ("convnext_t stage 2 dw7x7", (8, 28, 28, 192), 7, 1),
    ("convnext_t stage 3 dw7x7", (8, 14, 14, 384), 7, 1),
    ("convnext_t stage 4 dw7x7", (8, 7, 7, 768), 7, 1),
    ("mobilenetv2 block 1 dw3x3", (8, 112, 112, 32), 3, 1),
    ("mobilenetv2 block 2 dw3x3/2", (8, 112, 112, 96), 3, 2),
    ("mobilenetv2 block 3 dw3x3", (8, 56, 56, 144), 3, 1),
    ("ofa branch dw3x3/2", (8, 28, 28, 128), 3, 2),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", default="", help="comma-separated CPU ids to pin the process to")
    p.add_argument("--repeats", type=int, default=7, help="timed runs (the median is reported)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args(argv)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_jax(shape, kernel, stride, lowering, repeats) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxkd.models import layers

    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 1, shape[-1]))
    pad = (kernel - 1) // 2

    def conv(x, w):
        return layers.depthwise_conv2d(x, w, (stride, stride), (pad, pad), lowering)

    forward = jax.jit(conv)
    backward = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
    return {"forward_s": _median_seconds(lambda: forward(x, w).block_until_ready(), repeats),
            "forward_backward_s": _median_seconds(
                lambda: jax.block_until_ready(backward(x, w)), repeats)}


def time_torch(shape, kernel, stride, repeats) -> dict:
    import torch

    b, h, w, c = shape
    x = torch.randn(b, c, h, w, requires_grad=True)
    weight = torch.randn(c, 1, kernel, kernel, requires_grad=True)

    def conv():
        return torch.nn.functional.conv2d(x, weight, stride=stride, padding=(kernel - 1) // 2,
                                          groups=c)

    def forward():
        with torch.no_grad():
            conv()

    def forward_backward():
        x.grad = weight.grad = None
        conv().pow(2).sum().backward()

    return {"forward_s": _median_seconds(forward, repeats),
            "forward_backward_s": _median_seconds(forward_backward, repeats)}


def benchmark(args) -> dict:
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)  # XLA sizes its thread pool to these when it starts
    import jax

    from jaxkd.models import layers

    results = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
               "cpus": sorted(cpus), "load_average": os.getloadavg(),
               "chosen_lowering": layers.DEPTHWISE_LOWERING.get(jax.default_backend(), "xla"),
               "versions": {"jax": jax.__version__}, "cases": []}
    if not args.skip_torch:
        import torch

        torch.set_num_threads(len(cpus))
        results["versions"]["torch"] = torch.__version__
    print(f"backend {results['backend']}, CPUs {results['cpus']}, load average "
          f"{results['load_average'][0]:.1f}; times in ms: forward / forward + backward")
    for name, shape, kernel, stride in CASES:
        case = {"name": name, "shape": shape, "kernel": kernel, "stride": stride}
        for lowering in layers.LOWERINGS:
            case[lowering] = time_jax(shape, kernel, stride, lowering, args.repeats)
        if not args.skip_torch:
            case["torch_eager"] = time_torch(shape, kernel, stride, args.repeats)
        results["cases"].append(case)
        print(f"{name:30s}" + "".join(
            f"  {part} {1e3 * case[part]['forward_s']:7.1f} / "
            f"{1e3 * case[part]['forward_backward_s']:7.1f}"
            for part in (*layers.LOWERINGS, "torch_eager") if part in case), flush=True)
    if args.json:
        write_json(args.json, results)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: benchmark(args))


if __name__ == "__main__":
    sys.exit(main())
