"""The loop's lifecycle around the step: stop requests (SIGTERM/SIGINT, preemption),
progress, and what happens when a step's loss or gradient is non-finite."""

from __future__ import annotations

import logging
import signal
import threading
import time

import jax
import numpy as np

from jaxkd.errors import NonFiniteLossError

log = logging.getLogger(__name__)


def raise_if_nonfinite(fetched_metrics: list, step: int, ckpt) -> None:
    """`fetched_metrics` are those of the steps up to `step`."""
    first = step - len(fetched_metrics) + 1
    bad = [i for i, m in enumerate(fetched_metrics) if m["train/nonfinite"]]
    if bad:
        m = fetched_metrics[bad[0]]
        latest = ckpt.latest_step()
        good = "none yet" if latest is None else f"step {latest} in {ckpt.directory}"
        raise NonFiniteLossError(
            f"non-finite training loss or gradient at step {first + bad[0]} (loss "
            f"{float(m['train/loss'])}, gradient norm {float(m['train/grad_norm'])}); the "
            f"state after it was not saved. Last good checkpoint: {good}. Lower the learning "
            "rate, or set skip_nonfinite_updates=True to skip such updates")


def mean_metrics(metrics_list):
    """Means over the steps; skipped non-finite steps count only in train/nonfinite (the
    fraction of such steps), unless every step was one."""
    finite = [m for m in metrics_list if not m["train/nonfinite"]] or metrics_list
    means = {k: float(np.mean([float(m[k]) for m in finite])) for k in metrics_list[0]}
    means["train/nonfinite"] = float(np.mean([float(m["train/nonfinite"])
                                              for m in metrics_list]))
    return means


class StopRequests:
    """SIGTERM and SIGINT ask the loop to stop after the current step, which it checkpoints
    before raising Preempted; a second signal has its usual effect at once. With several
    processes JAX's preemption service (SIGTERM) picks the step at which all of them stop."""

    def __init__(self):
        self.reason = ""
        self._previous = {}

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        self.reason = f"stopped by {name}"
        log.warning("%s: finishing the current step, then saving a checkpoint and exiting "
                    "(a second signal stops at once)", name)
        self._restore_handlers()

    def _restore_handlers(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.reason = "preempted (SIGTERM)"
        return bool(self.reason)

    def __exit__(self, *exc_info):
        self._restore_handlers()


class Progress:
    """tqdm bar with images/s, the latest loss and ETA; a no-op when disabled."""

    def __init__(self, total, initial, batch_size, enabled):
        self._bar = None
        self._batch_size = batch_size
        self._start, self._done = time.perf_counter(), 0
        self.loss = float("nan")
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    def update(self):
        self._done += 1
        if self._bar is not None:
            rate = self._done * self._batch_size / (time.perf_counter() - self._start)
            self._bar.set_postfix_str(f"{rate:.0f} img/s, loss {self.loss:.4f}", refresh=False)
            self._bar.update()

    def close(self):
        if self._bar is not None:
            self._bar.close()
