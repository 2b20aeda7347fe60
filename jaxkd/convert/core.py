"""Strict checkpoint -> Flax conversion (and back to timm), shared by every model family.

A family describes timm's layout with one pure function `timm_key(path) -> (key, transform)`
that names, for every Flax leaf path (collection first, e.g. ('params', 'head', 'kernel')),
the timm state-dict key it comes from and how the array is laid out. Each family module
registers that mapping for its model names (`register_converter`), together with the other
checkpoint layouts its models come in (jaxkd.convert.layouts); a checkpoint's layout is found
from its keys. The core does the accounting both ways so that a wrong layout is one loud error
listing every mismatch. Buffers an original code stores whose values follow from the model
(`Converter.derived_buffers`) are checked on import and written on export.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import flax
import jax
import numpy as np

from jaxkd.convert.layouts import ORIGINAL, TIMM, Layout, LayoutError
from jaxkd.errors import CheckpointError
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

# Flat Flax variables (arrays or their shapes) -> {state-dict key: buffer value}.
DerivedBuffers = Callable[[Mapping[tuple[str, ...], Any]], dict[str, np.ndarray]]


def no_derived_buffers(variables: Mapping[tuple[str, ...], Any]) -> dict[str, np.ndarray]:
    return {}


class ConversionError(CheckpointError):
    """A checkpoint that does not fit the model it is converted for."""


@dataclasses.dataclass(frozen=True)
class Converter:
    """How one family's Flax variables map to timm state-dict keys."""

    name: str  # the family, e.g. 'swin'
    timm_key: Callable[[tuple[str, ...]], tuple[str, str]]
    # Layouts besides timm's own that checkpoints of these models come in.
    layouts: tuple[Layout, ...] = ()
    head: tuple[str, ...] = ("head",)  # the classifier's Flax module path
    # Whether timm builds these models with this very key layout, so that timm can check a
    # conversion (not CRD's CIFAR models: timm lacks them, or its vgg13 is ImageNet's).
    timm_twin: bool = True
    # Persistent buffers the original code keeps in its state dicts whose values follow from
    # the model's variable shapes (CycleMLP's sampling offsets), computed from the flat
    # variables: a checkpoint that holds one must hold exactly these values (one without it
    # loads: nothing is lost), and an export writes them.
    derived_buffers: DerivedBuffers = no_derived_buffers

    @property
    def head_key(self) -> str:
        """timm key of the classifier weight, whose rows give the class count."""
        return self.timm_key(("params", *self.head, "kernel"))[0]

    def is_head(self, path: tuple[str, ...]) -> bool:
        return path[1:1 + len(self.head)] == self.head

    @property
    def default_layout(self) -> Layout:
        """timm's keys; for models timm lacks, their original code's (the same keys)."""
        return TIMM if self.timm_twin else ORIGINAL

    def layout_of(self, keys) -> Layout:
        """The layout whose keys the checkpoint has; the default when no other claims it."""
        return next((layout for layout in self.layouts if layout.claims(keys)),
                    self.default_layout)


_CONVERTERS: dict[str, Converter] = {}


def register_converter(converter: Converter, model_names: Iterable[str]) -> None:
    for name in model_names:
        if name in _CONVERTERS:
            raise ValueError(f"model {name!r} has two converters")
        _CONVERTERS[name] = converter


def converter_for(name: str) -> Converter:
    registry.model_info(name)  # an unknown model: an error that lists the registered ones
    try:
        return _CONVERTERS[name]
    except KeyError:
        raise ConversionError(
            f"model {name!r} has no checkpoint converter (models with one: "
            f"{', '.join(sorted(_CONVERTERS))})") from None


@dataclasses.dataclass(frozen=True)
class Conversion:
    """Converted variables and what was found in the checkpoint."""

    variables: dict
    num_classes: int  # 0: a headless backbone (timm's num_classes=0), no classifier variables
    layout: Layout
    left_out: dict[str, list[str]]  # reason -> checkpoint keys deliberately not converted


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
    images = jax.ShapeDtypeStruct((1, *input_hw(name, overrides), 3), np.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)


def apply_converted(name: str, variables: Mapping[str, Any], images, **overrides):
    """`(logits, features)` of converted variables on NHWC images (jitted); logits are None
    for a headless conversion (the model built with num_classes 0 has no classifier)."""
    converter = converter_for(name)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    headless = not any(converter.is_head(path) for path in flat)
    num_classes = 0 if headless else flat[("params", *converter.head, "kernel")].shape[-1]
    model = registry.create_model(name, num_classes=num_classes, **overrides)
    logits, features = jax.jit(model.apply)(variables, images)
    return (None if headless else logits), features


def timm_to_flax(name: str, state_dict: Mapping[str, Any], **kwargs) -> dict:
    """`{'params', 'batch_stats'}` for `create_model(name)` from a checkpoint in any layout
    jaxkd reads for the model; see `convert_checkpoint`."""
    return convert_checkpoint(name, state_dict, **kwargs).variables


def convert_checkpoint(
    name: str,
    state_dict: Mapping[str, Any],
    *,
    num_classes: int | None = None,
    reinit_head: bool = False,
    seed: int = 0,
    **overrides,
) -> Conversion:
    """Converts a checkpoint (timm's keys or another layout, found from its keys) for
    `create_model(name, **overrides)`.

    `num_classes` defaults to the checkpoint's own head size (0 for a layout without a
    classifier, whose conversion then has no head variables). With `reinit_head=True` a head
    of another class count, or one the checkpoint lacks, is freshly initialised instead of
    being an error; nothing is ever dropped silently.
    """
    converter = converter_for(name)
    if reinit_head and num_classes is None:
        raise ConversionError("reinit_head=True needs num_classes (the new head's size)")
    arrays = {k: to_numpy(v) for k, v in state_dict.items()}
    layout = converter.layout_of(arrays.keys())
    try:
        normalised = layout.normalise(arrays)
    except LayoutError as e:
        raise ConversionError(f"cannot read the checkpoint as {layout.name}: {e}") from None
    sd = normalised.state_dict
    head_key = converter.head_key
    if num_classes is None and layout.headless:
        num_classes = 0
    elif num_classes is None and head_key in sd:
        num_classes = int(sd[head_key].shape[0])
    # Keys do not depend on the class count: an unknown one builds a 1-class head to list them.
    shapes = flax.traverse_util.flatten_dict(flax.core.unfreeze(
        abstract_variables(name, num_classes or 1, **overrides)))
    if num_classes == 0:
        shapes = {path: leaf for path, leaf in shapes.items() if not converter.is_head(path)}
    fresh = None
    out, used, missing, bad_shape, head_unfit = {}, set(), [], [], False
    for path, leaf in shapes.items():
        key, kind = converter.timm_key(path)
        is_head = converter.is_head(path)
        reinit = reinit_head and is_head
        if key in sd:
            used.add(key)
            value = _FORWARD[kind](sd[key])
            if value.shape == leaf.shape:
                out[path] = value.astype(leaf.dtype)
                continue
            if not reinit:
                bad_shape.append(
                    f"{normalised.source(key)}: checkpoint {sd[key].shape} -> "
                    f"{tuple(value.shape)}, model wants {tuple(leaf.shape)} at {'/'.join(path)}")
                head_unfit |= is_head
                continue
        elif not reinit:
            missing.append(f"{'/'.join(path)} <- {key}")
            head_unfit |= is_head
            continue
        if fresh is None:
            fresh = _fresh_head(name, num_classes, seed, converter.head, overrides)
        out[path] = np.asarray(fresh[path[1 + len(converter.head):]])
    bad_buffer = []
    for key, expected in converter.derived_buffers(shapes).items():
        if key not in sd:  # nothing to check: the model computes it
            continue
        used.add(key)
        if (difference := _buffer_difference(sd[key], expected)) is not None:
            bad_buffer.append(f"{normalised.source(key)}: {difference}")
    unused = sorted(normalised.source(k) for k in sd
                    if k not in used and not k.endswith(_DERIVED_SUFFIXES))
    if missing or unused or bad_shape or bad_buffer:
        raise ConversionError(_mismatch_message(
            name, converter, layout, num_classes, overrides, missing, unused, bad_shape,
            bad_buffer, head_unfit, head_key))
    return Conversion(flax.traverse_util.unflatten_dict(out), num_classes, layout,
                      normalised.left_out)


def _buffer_difference(value: np.ndarray, expected: np.ndarray) -> str | None:
    """How a checkpoint's buffer differs from the one the model computes; None if equal."""
    if value.shape != expected.shape:
        return f"checkpoint {value.shape}, the model computes {expected.shape}"
    unequal = np.argwhere(value != expected)
    if not len(unequal):
        return None
    index = tuple(int(i) for i in unequal[0])
    return (f"{len(unequal)} of {value.size} values differ, the first at {index}: checkpoint "
            f"{value[index]}, the model computes {expected[index]}")


def _mismatch_message(name, converter, layout, num_classes, overrides, missing, unused,
                      bad_shape, bad_buffer, head_unfit, head_key) -> str:
    classes = (f"num_classes={num_classes}" if num_classes is not None
               else f"num_classes unknown: the checkpoint has no {head_key!r}")
    lines = [f"checkpoint does not match model {name!r} ({classes}, overrides={overrides})"]
    default = converter.default_layout
    if layout is not default:
        lines[0] += f", read as {layout.name}:"
    elif missing or unused:
        known = ", ".join(l.name for l in (default, *converter.layouts))
        lines[0] += (f": its keys are in none of the layouts read for this model ({known}); "
                     f"compared with {default.name} keys:")
    else:
        lines[0] += ":"
    if missing:
        lines += ["  model variables with no checkpoint key:"] + [f"    {m}" for m in missing]
    if unused:
        lines += ["  checkpoint keys the model does not use:"] + [f"    {u}" for u in unused]
    if bad_shape:
        lines += ["  shape mismatches:"] + [f"    {b}" for b in bad_shape]
    if bad_buffer:
        lines += ["  buffers unlike the ones the model computes:"] + [
            f"    {b}" for b in bad_buffer]
    if head_unfit:
        lines.append("  (a head of another class count, or none, loads with reinit_head=True: "
                     "a fresh classifier)")
    return "\n".join(lines)


def _fresh_head(name, num_classes, seed, head, overrides):
    """A newly initialised head, flattened. Only the head subtree is returned from the jitted
    init, so XLA drops the initialisers of every other parameter (most of the compile time)."""
    model = registry.create_model(name, num_classes=num_classes, **overrides)
    images = np.zeros((1, *input_hw(name, overrides), 3), np.float32)

    def init_head(rng):
        subtree = model.init(rng, images, train=False)["params"]
        for part in head:
            subtree = subtree[part]
        return subtree

    return flax.traverse_util.flatten_dict(
        flax.core.unfreeze(jax.jit(init_head)(jax.random.PRNGKey(seed))))


def input_hw(name: str, overrides: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) of the images a model built with `overrides` takes."""
    size = overrides.get("img_size", registry.model_info(name).input_size)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def flax_to_timm(name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of `timm_to_flax`: a state dict (timm 1.0's layout) that timm loads with
    `strict=True`; variables without a head load into timm's `num_classes=0` model."""
    converter = converter_for(name)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    sd = {}
    for path, value in flat.items():
        key, kind = converter.timm_key(path)
        sd[key] = np.ascontiguousarray(_INVERSE[kind](np.asarray(value, dtype=np.float32)))
        if key.endswith("running_var"):
            sd[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    sd.update(converter.derived_buffers(flat))
    return sd
