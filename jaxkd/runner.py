"""Runs a config: one training run, or a suite of runs compared in one table and plot.

A suite config has `runs` (a ConfigDict of complete run configs) and `run_order`. A run's
`teacher.checkpoint` may be `run:<name>`, the export of an earlier run of the same suite, so a
demo can train its teacher first; a finished run is reused, not retrained (it resumes at its
last step).
"""

from __future__ import annotations

import json
import logging
import os

import jax

from jaxkd import sharding, train
from jaxkd.errors import ConfigError
from jaxkd.metric_writer import read_metrics

log = logging.getLogger(__name__)

_RUN_PREFIX = "run:"


def run(config, workdir: str) -> dict:
    # Before any device is touched: a multi-process run must see every process's devices.
    sharding.initialize_distributed(config)
    if "runs" in config:
        return run_suite(config, workdir)
    return train.train_and_evaluate(config, workdir)


def run_suite(config, workdir: str) -> dict:
    order = list(config.run_order)
    missing = [name for name in order if name not in config.runs]
    if missing:
        raise ConfigError(f"run_order names runs that config.runs lacks: {missing}")
    results = {}
    for name in order:
        run_config = config.runs[name]
        checkpoint = run_config.teacher.checkpoint
        if checkpoint.startswith(_RUN_PREFIX):
            source = checkpoint[len(_RUN_PREFIX):]
            if source not in results:
                raise ConfigError(f"run {name!r} takes its teacher from run {source!r}, which "
                                  "must come earlier in run_order")
            with run_config.unlocked():
                run_config.teacher.checkpoint = os.path.join(workdir, source, "export")
        log.info("suite %s: run %r", workdir, name)
        results[name] = train.train_and_evaluate(run_config, os.path.join(workdir, name))
    if jax.process_index() == 0:  # one writer in a multi-process run
        write_summary(config, workdir, results)
    return results


def write_summary(config, workdir: str, results: dict) -> None:
    """Prints the comparison table; writes summary.md, summary.json and accuracy.png."""
    title = config.get("title", "jaxkd suite")

    def cell(result, key):
        return f"{result[key]:.2f}" if key in result else "-"

    rows = [f"| {name} | {config.runs[name].get('description', '')} | "
            f"{cell(results[name], 'eval/teacher_top1')} | "
            f"{cell(results[name], _headline(results[name]))} |" for name in config.run_order]
    table = "\n".join([f"## {title}", "",
                       "| run | what | its teacher's top-1 (%) | held-out top-1 (%) |",
                       "|---|---|---|---|", *rows])
    print("\n" + table + "\n")
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(table + "\n")
        if config.get("notes"):
            f.write("\n" + config.notes.strip() + "\n")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    plot_accuracy_curves(workdir, list(config.run_order), title)


def _headline(result: dict) -> str:
    """eval/top1, or eval/knn_top1 for an unsupervised run (its head is never trained)."""
    return "eval/top1" if "eval/top1" in result else "eval/knn_top1"


def plot_accuracy_curves(workdir: str, names: list[str], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in names:
        points = [(m["step"], m["eval/top1"]) for m in read_metrics(os.path.join(workdir, name))
                  if "eval/top1" in m]
        if points:
            steps, top1 = zip(*sorted(dict(points).items()))
            ax.plot(steps, top1, marker="o", markersize=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, "accuracy.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
