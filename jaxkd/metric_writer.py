"""Metrics where people look: stdout, <workdir>/metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import logging
import os

import numpy as np

log = logging.getLogger(__name__)


class MetricWriter:
    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self._workdir = workdir
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = {}  # TensorBoard run (a sub-directory of tensorboard/, "" for none) -> writer

    def _tensorboard(self, run: str):
        if run not in self._tb:
            from tensorboardX import SummaryWriter

            self._tb[run] = SummaryWriter(os.path.join(self._workdir, "tensorboard", run))
        return self._tb[run]

    def write(self, step: int, metrics: dict, *, labels: dict | None = None,
              run: str = "") -> None:
        """One row of scalars at `step`. `labels`: what else the row records, as it is (a
        population member's index, seed and swept values); `run`: the TensorBoard run the
        scalars go to (one per population member)."""
        if not self.enabled or not metrics:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        labels = labels or {}
        self._jsonl.write(json.dumps({"step": int(step), **labels, **scalars}) + "\n")
        self._jsonl.flush()
        tb = self._tensorboard(run)
        for k, v in scalars.items():
            tb.add_scalar(k, v, step)
        tb.flush()
        prefix = f"{run}: " if run else ""
        log.info("step %d: %s%s", step, prefix,
                 ", ".join(f"{k}={v:.5g}" for k, v in scalars.items()))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            for tb in self._tb.values():
                tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, data) -> None:
    """A script's results as indented JSON at `path` (its folder made), announced on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {path}")
