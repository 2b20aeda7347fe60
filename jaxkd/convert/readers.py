"""Reads PyTorch/timm checkpoint files into flat numpy state dicts, never running pickled code.

`.safetensors` files are read with the safetensors package and Google's `.npz` parameter files
with numpy (`allow_pickle=False`), neither needing torch. `.pth`, `.pt`, `.bin` and timm's
`.pth.tar` are read with `torch.load(weights_only=True)`, which refuses any pickle that would
construct arbitrary objects. Training checkpoints that wrap the weights
(under 'state_dict', 'model' or 'model_ema', as the OFA CIFAR-100 teachers are published) are
unwrapped, and DDP's 'module.' prefix is stripped.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import numpy as np

from jaxkd.convert.core import to_numpy
from jaxkd.errors import CheckpointError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".pth.tar")
# Checked in this order: a raw model's weights before its EMA copy, as timm's loader does.
WRAPPER_KEYS = ("state_dict", "model", "model_ema")
_DDP_PREFIX = "module."


class CheckpointReadError(CheckpointError):
    """A checkpoint file that cannot be read safely (a ValueError, like every CheckpointError)."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Flat {timm key: array} from a checkpoint file; bfloat16 tensors come back as float32."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointReadError(f"checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        loaded = _read_safetensors(path)
    elif path.endswith(".npz"):
        loaded = _read_npz(path)
    elif path.endswith(TORCH_SUFFIXES):
        loaded = _read_torch(path)
    else:
        raise CheckpointReadError(
            f"cannot read {path!r}: unknown checkpoint extension (expected .safetensors, .npz, "
            f"{', '.join(TORCH_SUFFIXES)})")
    return _clean(path, loaded)


def state_dict_from_timm_model(model: Any) -> dict[str, np.ndarray]:
    """The numpy state dict of a live timm/PyTorch module."""
    return {k: to_numpy(v) for k, v in model.state_dict().items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointReadError(f"{path!r} is not a valid safetensors file (corrupt or "
                                  f"truncated?): {_first_line(e)}") from None


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """A Flax parameter tree saved by np.savez with '/'-joined keys (Google's ViT/Mixer)."""
    damaged = (ValueError, OSError, EOFError, zipfile.BadZipFile)
    try:
        archive = np.load(path, allow_pickle=False)
    except damaged as e:
        raise CheckpointReadError(f"{path!r} is not a readable .npz file (corrupt or "
                                  f"truncated?): {_first_line(e)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CheckpointReadError(f"{path!r} holds one array, not an .npz archive of named "
                                  f"parameters")
    with archive:
        try:
            return {key: archive[key] for key in archive.files}
        except damaged as e:
            if "allow_pickle" in str(e):  # an object array: reading it means unpickling
                raise CheckpointReadError(
                    f"refusing to read {path!r}: it holds pickled Python objects, which could "
                    f"run arbitrary code when loaded") from None
            raise CheckpointReadError(f"{path!r} is corrupt or truncated: "
                                      f"{_first_line(e)}") from None


def _read_torch(path: str) -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointReadError(f"reading {path!r} needs PyTorch (pip install 'jaxkd[timm]'); "
                                  f"a .safetensors file needs only safetensors") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointReadError(
                f"refusing to read {path!r}: it holds pickled Python objects beyond tensors, "
                f"which could run arbitrary code when loaded. Re-save only its state dict "
                f"(torch.save(model.state_dict(), ...)) or convert it to .safetensors") from None
        raise CheckpointReadError(f"{path!r} is corrupt or truncated: {_first_line(e)}") from None
    except Exception as e:  # torch reports damaged files as RuntimeError, KeyError, EOFError ...
        raise CheckpointReadError(f"{path!r} is not a readable PyTorch checkpoint (corrupt or "
                                  f"truncated?): {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _clean(path: str, loaded: Any) -> dict[str, np.ndarray]:
    """Unwraps a training checkpoint, strips 'module.', and checks every value is a tensor."""
    if not isinstance(loaded, dict):
        raise CheckpointReadError(f"{path!r} holds a {type(loaded).__name__}, not a state dict")
    for key in WRAPPER_KEYS:
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    tensors, others = {}, []
    for key, value in loaded.items():
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            name = key[len(_DDP_PREFIX):] if key.startswith(_DDP_PREFIX) else key
            array = to_numpy(value)
            # safetensors yields ml_dtypes' bfloat16; widen it exactly, as to_numpy does for torch.
            tensors[name] = array.astype(np.float32) if array.dtype.name == "bfloat16" else array
        else:
            others.append(key)
    if not tensors:
        raise CheckpointReadError(
            f"no tensors found in {path!r} (top-level keys: {sorted(map(str, loaded))[:20]}); "
            f"expected a state dict, possibly under one of {WRAPPER_KEYS}")
    if others:
        raise CheckpointReadError(f"{path!r} mixes tensors with other values under keys "
                                  f"{sorted(map(str, others))[:20]}: not a state dict")
    return tensors
