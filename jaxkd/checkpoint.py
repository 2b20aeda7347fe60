"""Checkpoints: exported models (safetensors + JSON, never pickle) and Orbax train states.

A model export (`save_model`/`load_model`) is what serves as a teacher: converted timm weights
or the result of a supervised run. Train checkpoints (`TrainCheckpointer`) hold the student,
the method's modules, the optimiser state and the step; teachers are never stored in them,
they are reloaded from their own export.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import flax
import numpy as np

from jaxkd.errors import CheckpointError

_WEIGHTS = "variables.safetensors"
_META = "model.json"


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

    The metadata records what the state belongs to (student, method, teacher); resuming a
    workdir written by another configuration is refused instead of restoring mismatched arrays.
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
        ocp = self._ocp
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_host_copies(state)), meta=ocp.args.JsonSave(meta)),
            force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any, expected_meta: dict) -> Any:
        """Restores onto the shardings in `abstract_state` after checking the run metadata."""
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
        return self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )["state"]

    def close(self) -> None:
        self._manager.close()


def _host_copies(tree):
    """Replicated arrays as one numpy copy each: Orbax then writes them without compiling a
    slicing program per array (a large share of a small run's time on CPU)."""
    import jax

    def host(x):
        if isinstance(x, jax.Array) and x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return x

    return jax.tree.map(host, tree)
