"""Runs a config: one training run, or a suite of runs compared in one table and plot.

A suite config has `runs` (a ConfigDict of complete run configs) and `run_order`. A run's
`teacher.checkpoint` may be `run:<name>`, the export of an earlier run of the same suite, so a
demo can train its teacher first; a finished run is reused, not retrained (it resumes at its
last step). A run may be a population (jaxkd.population): its rows in the summary are its
settings, each the mean ± std over its seeds; a population run on its own gets the same
summary in its workdir.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from jaxkd import population, sharding, train
from jaxkd.errors import ConfigError
from jaxkd.metric_writer import read_metrics

log = logging.getLogger(__name__)

_RUN_PREFIX = "run:"


def run(config, workdir: str) -> dict:
    # Before any device is touched: a multi-process run must see every process's devices.
    sharding.initialize_distributed(config)
    if "runs" in config:
        return run_suite(config, workdir)
    result = train.train_and_evaluate(config, workdir)
    if "population" in result and jax.process_index() == 0:
        write_summary(config.get("description", "") or "jaxkd population", "", workdir,
                      [("population", config.get("description", ""), workdir, result)])
    return result


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
            if "population" in results[source]:
                raise ConfigError(f"run {name!r} takes its teacher from run {source!r}, a "
                                  "population: name one of its exports, "
                                  f"{os.path.join(workdir, source, 'export', 'member_<i>')}")
            with run_config.unlocked():
                run_config.teacher.checkpoint = os.path.join(workdir, source, "export")
        log.info("suite %s: run %r", workdir, name)
        results[name] = train.train_and_evaluate(run_config, os.path.join(workdir, name))
    if jax.process_index() == 0:  # one writer in a multi-process run
        write_summary(config.get("title", "jaxkd suite"), config.get("notes", ""), workdir,
                      [(name, config.runs[name].get("description", ""),
                        os.path.join(workdir, name), results[name]) for name in order])
    return results


def _cell(value) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.2f}"


def _summary_rows(name: str, description: str, result: dict) -> list[dict]:
    """A run's rows of the summary: one for a single run, one per setting of a population."""
    teacher = result.get("eval/teacher_top1")
    if "population" not in result:
        metric = population.headline_metric(result)
        return [{"run": name, "what": description, "settings": {}, "teacher_top1": teacher,
                 "metric": metric, "mean": result[metric], "std": None, "n": 1, "best": None,
                 "frozen": []}]
    return [{"run": name, "what": description, "teacher_top1": teacher, **row}
            for row in population.setting_rows(result["population"])]


def _setting_text(settings: dict) -> str:
    return ", ".join(f"{path}={value:g}" for path, value in settings.items()) or "-"


def write_summary(title: str, notes: str, workdir: str, entries: list[tuple]) -> None:
    """Prints the comparison table; writes summary.md, summary.json, accuracy.png and, for
    populations sweeping one field, sweep.png. `entries`: (name, description, workdir,
    result) of each run, in order. A population's rows are its settings: the held-out top-1
    as mean ± sample std over its seeds, n, and the best member."""
    rows = [row for name, description, _, result in entries
            for row in _summary_rows(name, description, result)]
    if any("population" in result for *_, result in entries):
        lines = ["| run | what | setting | its teacher's top-1 (%) | held-out top-1 (%): mean "
                 "± std | n | best member |", "|---|---|---|---|---|---|---|"]
        for row in rows:
            spread = "" if row["std"] is None or not row["n"] else f" ± {row['std']:.2f}"
            best = ("-" if row["best"] is None else
                    f"{row['best']['member']} (seed {row['best']['seed']}): "
                    f"{row['best']['value']:.2f}")
            frozen = f" ({len(row['frozen'])} frozen)" if row["frozen"] else ""
            lines.append(f"| {row['run']} | {row['what']} | {_setting_text(row['settings'])} | "
                         f"{_cell(row['teacher_top1'])} | {_cell(row['mean'])}{spread} | "
                         f"{row['n']}{frozen} | {best} |")
    else:
        lines = ["| run | what | its teacher's top-1 (%) | held-out top-1 (%) |",
                 "|---|---|---|---|"]
        lines += [f"| {row['run']} | {row['what']} | {_cell(row['teacher_top1'])} | "
                  f"{_cell(row['mean'])} |" for row in rows]
    frozen = [f"{row['run']} member {f['member']} (seed {f['seed']}, "
              f"{_setting_text(row['settings'])}): frozen at step {f['step']}, loss "
              f"{f['loss']:g}, gradient norm {f['grad_norm']:g}"
              for row in rows for f in row["frozen"]]
    table = "\n".join([f"## {title}", "", *lines])
    if frozen:
        table += ("\n\nMembers whose loss or gradient turned non-finite (left out of mean ± "
                  "std):\n" + "\n".join(f"- {line}" for line in frozen))
    print("\n" + table + "\n")
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(table + "\n")
        if notes:
            f.write("\n" + notes.strip() + "\n")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"runs": {name: result for name, _, _, result in entries}, "rows": rows}, f,
                  indent=2, sort_keys=True)
    plot_accuracy_curves(workdir, entries, title)
    plot_sweeps(workdir, entries, title)


def _curves(run_dir: str, result: dict) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(label, steps, mean, std) of the held-out headline metric over training: one curve for
    a single run, one per setting of a population (over its members that were not frozen)."""
    metric = (population.headline_metric(result) if "population" not in result else
              population.headline_metric(result["population"][0]))
    rows = [m for m in read_metrics(run_dir) if metric in m]
    if "population" not in result:
        points = dict(sorted((m["step"], m[metric]) for m in rows))
        steps = np.asarray(list(points), np.float64)
        values = np.asarray(list(points.values()), np.float64)
        return [("", steps, values, np.zeros_like(values))] if len(steps) else []
    frozen = {m["member"] for m in result["population"] if m["frozen"]}
    by_setting: dict[str, dict[int, dict[int, float]]] = {}
    for m in rows:
        if "member" in m and m["member"] not in frozen:
            key = _setting_text(m.get("settings", {}))
            by_setting.setdefault(key, {}).setdefault(m["member"], {})[m["step"]] = m[metric]
    curves = []
    for key, members in by_setting.items():
        steps = sorted(set.intersection(*(set(v) for v in members.values())))
        values = np.asarray([[members[i][s] for s in steps] for i in members], np.float64)
        std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
        curves.append(("" if key == "-" else key, np.asarray(steps), values.mean(axis=0), std))
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_curves(workdir: str, entries: list[tuple], title: str) -> str:
    """accuracy.png: each run's held-out top-1 over training; a population's settings as the
    mean over their seeds with a ± std band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, _, run_dir, result in entries:
        for label, steps, mean, std in _curves(run_dir, result):
            line, = ax.plot(steps, mean, marker="o", markersize=3,
                            label=f"{name} {label}".strip())
            if std.any():
                ax.fill_between(steps, mean - std, mean + std, color=line.get_color(),
                                alpha=0.2, linewidth=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out top-1 (%)")
    return _save_figure(plt, fig, ax, title, os.path.join(workdir, "accuracy.png"))


def plot_sweeps(workdir: str, entries: list[tuple], title: str) -> str | None:
    """sweep.png: for each population sweeping one field, the final held-out top-1 against
    the swept value (mean over the seeds, error bars ± std); None when there is none."""
    sweeps = []
    for name, _, _, result in entries:
        if "population" not in result:
            continue
        rows = population.setting_rows(result["population"])
        fields = {path for row in rows for path in row["settings"]}
        if len(fields) == 1:
            sweeps.append((name, fields.pop(), rows))
    if not sweeps:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, field, rows in sweeps:
        rows = sorted((r for r in rows if r["n"]), key=lambda r: r["settings"][field])
        ax.errorbar([r["settings"][field] for r in rows], [r["mean"] for r in rows],
                    yerr=[r["std"] for r in rows], marker="o", capsize=4,
                    label=f"{name}: {field}")
    ax.set_xlabel(" / ".join(sorted({field for _, field, _ in sweeps})))
    ax.set_ylabel("final held-out top-1 (%), mean ± std over seeds")
    return _save_figure(plt, fig, ax, title, os.path.join(workdir, "sweep.png"))


def _save_figure(plt, fig, ax, title: str, path: str) -> str:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
