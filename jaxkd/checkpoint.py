"""Checkpoints: exported models (safetensors + JSON, never pickle) and Orbax train states.

A model export (`save_model`/`load_model`) is what serves as a teacher: converted timm weights
or the result of a supervised run. Train checkpoints (`TrainCheckpointer`) hold the student,
the method's modules, the optimiser state and the step; teachers are never stored in them,
they are reloaded from their own export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import flax
import numpy as np

from jaxkd.errors import CheckpointError

log = logging.getLogger(__name__)

_WEIGHTS = "variables.safetensors"
_META = "model.json"
# In each train checkpoint's step directory: size and sha256 of every file Orbax wrote there.
_CHECKSUMS = "jaxkd_checksums.json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(
    out_dir: str,
    variables: Any,
    *,
    model_name: str,
    num_classes: int,
    overrides: dict | None = None,
    extra: dict | None = None,
) -> str:
    """Writes `variables` ({'params', 'batch_stats'}) as a self-describing model export."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
    weights = os.path.join(out_dir, _WEIGHTS)
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}, weights)
    meta = {
        "model_name": model_name,
        "num_classes": int(num_classes),
        "overrides": dict(overrides or {}),
        "sha256": _sha256(weights),
        **(extra or {}),
    }
    with open(os.path.join(out_dir, _META), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return out_dir


def is_model_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _META)) and os.path.isfile(
        os.path.join(path, _WEIGHTS)
    )


def load_model(path: str) -> tuple[dict, dict]:
    """Reads a model export; returns (variables, meta). Verifies the weights' checksum."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not os.path.isdir(path):
        raise CheckpointError(
            f"model checkpoint {path!r} does not exist (expected a directory "
            f"with {_META} and {_WEIGHTS}, as written by a supervised run's "
            f"export/ or scripts/convert_timm.py)"
        )
    if not is_model_export(path):
        raise CheckpointError(
            f"{path!r} is not a jaxkd model export: it lacks {_META} or "
            f"{_WEIGHTS} (convert timm weights with scripts/convert_timm.py)"
        )
    try:
        with open(os.path.join(path, _META)) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {os.path.join(path, _META)}: {e}") from None
    weights = os.path.join(path, _WEIGHTS)
    if meta.get("sha256") != _sha256(weights):
        raise CheckpointError(f"{weights} is corrupt: its checksum does not match {_META}")
    try:
        flat = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    variables = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    return variables, meta


class TrainCheckpointer:
    """Orbax manager for train states in `<workdir>/checkpoints`, with run metadata as JSON.

    The metadata records what the state belongs to (student, method, teacher, dataset);
    resuming a workdir written by another configuration is refused instead of restoring
    mismatched arrays. Each checkpoint also gets the sha256 of its files, verified before a
    restore: Orbax reads flipped bytes back as wrong values without noticing.
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        import jax

        ocp = self._ocp
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_host_copies(state)), meta=ocp.args.JsonSave(meta)),
            force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            _write_checksums(self._step_dir(step))

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _corrupt_message(self, step: int, problems: list[str]) -> str:
        return f"checkpoint step {step} in {self.directory} is corrupt: " + "; ".join(problems)

    def restore(self, step: int, abstract_state: Any, expected_meta: dict) -> Any:
        """Restores onto the shardings in `abstract_state` after checking the files' checksums
        and the run metadata."""
        problems = checksum_problems(self._step_dir(step))
        if problems:
            raise CheckpointError(self._corrupt_message(step, problems))
        return self._restore_verified(step, abstract_state, expected_meta)

    def restore_latest(self, abstract_state: Any, expected_meta: dict) -> tuple[int, Any] | None:
        """(step, state) of the newest intact checkpoint; None when there is no checkpoint.

        Newer checkpoints that fail their checksums are reported and skipped; once an older one
        restores they are moved to <workdir>/corrupt_checkpoints (so their steps can be saved
        again). When none is intact nothing is moved and CheckpointError says why.
        """
        corrupt = {}
        for step in sorted(self._manager.all_steps(), reverse=True):
            problems = checksum_problems(self._step_dir(step))
            if problems:
                corrupt[step] = problems
                log.error("%s", self._corrupt_message(step, problems))
                continue
            state = self._restore_verified(step, abstract_state, expected_meta)
            if corrupt:
                log.warning("falling back to the previous good checkpoint, step %d in %s "
                            "(skipped corrupt step(s) %s)", step, self.directory,
                            ", ".join(map(str, corrupt)))
            self._set_aside(list(corrupt))
            return step, state
        if corrupt:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}, so the run cannot continue:\n  " +
                "\n  ".join(self._corrupt_message(s, p) for s, p in corrupt.items()) +
                "\nmove the workdir (or its checkpoints/) away to start the run over")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Called by every process: none moves a checkpoint another one may still be reading."""
        import jax
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxkd: checkpoints verified and restored")
        if not steps:
            return
        aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target, n = os.path.join(aside, str(step)), 1
                while os.path.exists(target):
                    target, n = os.path.join(aside, f"{step}.{n}"), n + 1
                os.rename(self._step_dir(step), target)
                log.warning("moved corrupt checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxkd: corrupt checkpoints set aside")
        self._manager.reload()

    def _restore_verified(self, step: int, abstract_state: Any, expected_meta: dict) -> Any:
        ocp = self._ocp
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
        diffs = [
            f"{k}: checkpoint has {meta.get(k)!r}, config has {v!r}"
            for k, v in expected_meta.items()
            if meta.get(k) != v
        ]
        if diffs:
            raise CheckpointError(
                f"the checkpoint in {self.directory} (step {step}) was written by another "
                "configuration; use a new workdir or the matching config:\n  " + "\n  ".join(diffs)
            )
        try:
            return self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )["state"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit this config's train "
                f"state (a changed method or model setting?): {e}") from None

    def close(self) -> None:
        self._manager.close()


def _write_checksums(step_dir: str) -> None:
    sums = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            sums[os.path.relpath(path, step_dir)] = {"bytes": os.path.getsize(path),
                                                     "sha256": _sha256(path)}
    tmp = os.path.join(step_dir, _CHECKSUMS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(sums, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, _CHECKSUMS))


def checksum_problems(step_dir: str) -> list[str]:
    """What is wrong with a train checkpoint's files; [] when each matches its size and sha256."""
    try:
        with open(os.path.join(step_dir, _CHECKSUMS)) as f:
            sums = json.load(f)
    except FileNotFoundError:
        return [f"it has no {_CHECKSUMS} (the run stopped while saving it)"]
    except (OSError, ValueError) as e:
        return [f"its {_CHECKSUMS} is unreadable ({e})"]
    problems = []
    for name, expected in sorted(sums.items()):
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif os.path.getsize(path) != expected["bytes"]:
            problems.append(f"{name} has {os.path.getsize(path)} bytes, "
                            f"{expected['bytes']} were written (truncated?)")
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"{name} does not match its sha256 (bytes changed on disk)")
    return problems


def _host_copies(tree):
    """Replicated arrays as one numpy copy each: Orbax then writes them without compiling a
    slicing program per array (a large share of a small run's time on CPU)."""
    import jax

    def host(x):
        if isinstance(x, jax.Array) and x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return x

    return jax.tree.map(host, tree)
