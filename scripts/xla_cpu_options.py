r"""Times a model's training forward + backward under XLA compiler options, side by side.

  python scripts/xla_cpu_options.py --model resnet18 --cpus 0,1 \
      --option xla_cpu_use_onednn=true \
      --option xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION \
      --json docs/benchmarks/xla_cpu_options_resnet18.json

One lowered program (cross-entropy on random images at batch 8, 224 px, float32, BatchNorm in
training mode) compiled once per option set and once without; the variants run in interleaved
rounds so that load drifts hit them alike, and each reports its median step, its largest
gradient difference from the plain compile, or why it did not compile. What an option does is
XLA's business and changes between releases: this says whether one helps here and now.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from jaxkd.errors import ConfigError, run_cli
from jaxkd.metric_writer import write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="registered model name")
    p.add_argument("--option", action="append", default=[],
                   help="NAME=VALUE compiler option (true/false for booleans); repeatable")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (medians reported)")
    p.add_argument("--cpus", default="", help="comma-separated CPU ids to pin the process to")
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args(argv)


def parse_option(text: str) -> dict:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--option {text!r} is not NAME=VALUE")
    return {name: {"true": True, "false": False}.get(value.lower(), value)}


def measure(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkd import models

    variants = {"default": {}, **{text: parse_option(text) for text in args.option}}
    model = models.create_model(args.model, num_classes=100)
    rng = np.random.RandomState(0)
    size, batch = args.image_size, args.batch_size
    images = jnp.asarray(rng.rand(batch, size, size, 3).astype(np.float32))
    labels = jnp.asarray(rng.randint(0, 100, batch))
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images[:1]))()
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss(params, state):
        (logits, _), _ = model.apply({"params": params, **state}, images, train=True,
                                     mutable=list(state), rngs={"dropout": jax.random.PRNGKey(1)})
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch), labels])

    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, state)
    compiled, results = {}, {}
    for name, options in variants.items():
        start = time.perf_counter()
        try:
            compiled[name] = lowered.compile(compiler_options=options or None)
        except Exception as e:  # an option this jaxlib does not know or cannot apply
            results[name] = {"options": options, "error": str(e).splitlines()[0][:300]}
            continue
        results[name] = {"options": options, "compile_s": time.perf_counter() - start}
    if "default" not in compiled:
        raise RuntimeError(f"the plain compile failed: {results['default']['error']}")
    _, reference = compiled["default"](params, state)
    for name, fn in compiled.items():
        _, grads = fn(params, state)
        results[name]["max_grad_difference"] = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))
    times = {name: [] for name in compiled}
    for _ in range(args.rounds):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, state))
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        results[name].update(step_s=statistics.median(values), step_s_all=values)
    return {"model": args.model, "batch_size": batch, "image_size": size,
            "jax": jax.__version__, "load_average_after": os.getloadavg(),
            "variants": results}


def main(argv=None):
    args = parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    for text in args.option:
        parse_option(text)  # a malformed option fails before anything compiles
    results = measure(args)
    default = results["variants"]["default"]["step_s"]
    print(f"{args.model} training forward + backward, batch {args.batch_size}, "
          f"{args.image_size} px")
    print("| options | step (ms, median) | relative to default | max |grad diff| |")
    print("|---|---|---|---|")
    for name, r in results["variants"].items():
        if "error" in r:
            print(f"| {name} | did not compile: {r['error']} | | |")
        else:
            print(f"| {name} | {1e3 * r['step_s']:.1f} | {default / r['step_s']:.2f}x | "
                  f"{r['max_grad_difference']:.1e} |")
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
