"""Strict timm state dict <-> Flax variables conversion, shared by every model family.

A family describes its layout with one pure function `timm_key(path) -> (key, transform)`
that names, for every Flax leaf path (collection first, e.g. ('params', 'head', 'kernel')),
the timm state-dict key it comes from and how the array is laid out. The core does the
accounting both ways so that a wrong layout is one loud error listing every mismatch.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import flax
import jax
import numpy as np

from jaxkd.models import registry

# Layout transforms timm -> Flax; each is its own inverse's partner in _INVERSE.
_FORWARD: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda a: a,
    "linear": lambda a: a.T,  # [out, in] -> [in, out]
    "conv": lambda a: a.transpose(2, 3, 1, 0),  # OIHW -> HWIO
}
_INVERSE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),  # HWIO -> OIHW
}

# Buffers timm keeps in state dicts that Flax recomputes or does not track.
_DERIVED_SUFFIXES = ("num_batches_tracked", "relative_position_index", "attn_mask")


class ConversionError(ValueError):
    pass


def _family(name: str):
    """The layout named by the model's `converter`: a module of jaxkd.convert, or
    `module:attribute` for one of several layouts a module defines."""
    info = registry.model_info(name)
    if not info.converter:
        raise ConversionError(f"model {name!r} has no timm converter")
    module, _, layout = info.converter.partition(":")
    module = importlib.import_module(f"jaxkd.convert.{module}")
    return getattr(module, layout) if layout else module


def has_timm_twin(name: str) -> bool:
    """Whether timm builds `name` with this very state-dict layout, so that timm can check a
    conversion (false for layouts that declare `TIMM_TWIN = False`, such as CRD's CIFAR
    models, whose names timm lacks or gives to other models)."""
    return getattr(_family(name), "TIMM_TWIN", True)


def to_numpy(value: Any) -> np.ndarray:
    """numpy view of a numpy array or torch tensor, without importing torch."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def abstract_variables(name: str, num_classes: int, **overrides):
    """Shapes of a model's variables, computed without allocating them."""
    model = registry.create_model(name, num_classes=num_classes, **overrides)
    size = overrides.get("img_size", registry.model_info(name).input_size)
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = jax.ShapeDtypeStruct((1, *size, 3), np.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)


def timm_to_flax(
    name: str,
    state_dict: Mapping[str, Any],
    *,
    num_classes: int | None = None,
    reinit_head: bool = False,
    seed: int = 0,
    **overrides,
) -> dict:
    """Converts a timm state dict into `{'params', 'batch_stats'}` for `create_model(name)`.

    `num_classes` defaults to the checkpoint's own head size. With `reinit_head=True` a head of
    another class count (ImageNet weights into a CIFAR model) is freshly initialised instead of
    being an error; nothing is ever dropped silently.
    """
    family = _family(name)
    sd = {k: to_numpy(v) for k, v in state_dict.items()}
    if num_classes is None:
        num_classes = family.num_classes_of(sd)
    shapes = flax.traverse_util.flatten_dict(
        flax.core.unfreeze(abstract_variables(name, num_classes, **overrides))
    )
    head = family.HEAD_PREFIX
    fresh = None
    out, used, missing, bad_shape = {}, set(), [], []
    for path, leaf in shapes.items():
        key, kind = family.timm_key(path)
        if key not in sd:
            missing.append(f"{'/'.join(path)} <- {key}")
            continue
        used.add(key)
        value = _FORWARD[kind](sd[key])
        if value.shape != leaf.shape:
            if reinit_head and path[1 : 1 + len(head)] == head:
                if fresh is None:
                    fresh = _fresh_head(name, num_classes, seed, head, overrides)
                value = np.asarray(fresh[path[1 + len(head):]])
            else:
                bad_shape.append(
                    f"{key}: checkpoint {sd[key].shape} -> {tuple(value.shape)}, "
                    f"model wants {tuple(leaf.shape)} at {'/'.join(path)}"
                )
                continue
        out[path] = value.astype(leaf.dtype)
    unused = sorted(k for k in sd if k not in used and not k.endswith(_DERIVED_SUFFIXES))
    if missing or unused or bad_shape:
        lines = [
            f"checkpoint does not match model {name!r} (num_classes={num_classes}, "
            f"overrides={overrides}):"
        ]
        if missing:
            lines += ["  model variables with no checkpoint key:"] + [f"    {m}" for m in missing]
        if unused:
            lines += ["  checkpoint keys the model does not use:"] + [f"    {u}" for u in unused]
        if bad_shape:
            lines += ["  shape mismatches:"] + [f"    {b}" for b in bad_shape]
        if bad_shape and not reinit_head:
            lines.append("  (a head of another class count loads with reinit_head=True)")
        raise ConversionError("\n".join(lines))
    return flax.traverse_util.unflatten_dict(out)


def _fresh_head(name, num_classes, seed, head, overrides):
    """A newly initialised head, flattened. Only the head subtree is returned from the jitted
    init, so XLA drops the initialisers of every other parameter (most of the compile time)."""
    model = registry.create_model(name, num_classes=num_classes, **overrides)
    images = np.zeros((1, *_img_hw(name, overrides), 3), np.float32)

    def init_head(rng):
        subtree = model.init(rng, images, train=False)["params"]
        for part in head:
            subtree = subtree[part]
        return subtree

    return flax.traverse_util.flatten_dict(
        flax.core.unfreeze(jax.jit(init_head)(jax.random.PRNGKey(seed))))


def _img_hw(name, overrides):
    size = overrides.get("img_size", registry.model_info(name).input_size)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def flax_to_timm(name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of `timm_to_flax`: a state dict that timm loads with `strict=True`."""
    family = _family(name)
    sd = {}
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(variables)).items():
        key, kind = family.timm_key(path)
        sd[key] = np.ascontiguousarray(_INVERSE[kind](np.asarray(value, dtype=np.float32)))
        if key.endswith("running_var"):
            sd[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return sd
