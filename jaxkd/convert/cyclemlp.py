"""The original CycleMLP code's state-dict layout (OFA-KD's custom_model/cycle_mlp.py) for
jaxkd.models.cyclemlp.

The original keeps its blocks and downsampling convs in one list, `network`: stage s's blocks are
`network.{2s}.{j}`, the conv before stage s is `network.{2s - 1}.proj`. Every CycleFC
(`attn.sfc_h`, `attn.sfc_w`) stores a 1x1 conv weight [out, in, 1, 1] and, as a persistent
buffer, its sampling offsets `offset` [1, 2 * in, 1, 1] ((dy, dx) per input channel), which
follow from the channel count: they are checked on import and written on export.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxkd.convert.core import Converter, register_converter
from jaxkd.models.cyclemlp import CYCLE_FC_EXTENTS, cycle_offsets

_BLOCK = re.compile(r"stages_(\d+)_blocks_(\d+)")
_DOWNSAMPLE = re.compile(r"stages_(\d+)_downsample")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _module_key(modules: list[str]) -> tuple[str, bool]:
    """The original's module name of a Flax module path, and whether it is a conv."""
    top, rest = modules[0], modules[1:]
    if top == "patch_embed":
        return "patch_embed.proj", True
    if downsample := _DOWNSAMPLE.fullmatch(top):
        return f"network.{2 * int(downsample[1]) - 1}.proj", True
    if block := _BLOCK.fullmatch(top):
        name = ".".join([f"network.{2 * int(block[1])}.{block[2]}", *rest])
        return name, rest[-1] in CYCLE_FC_EXTENTS
    return ".".join(modules), False  # norm, head


def original_key(path: tuple[str, ...]) -> tuple[str, str]:
    collection, *modules, leaf = path
    if collection != "params":
        raise ValueError(f"CycleMLP only has 'params' variables, got {'/'.join(path)}")
    name, is_conv = _module_key(modules)
    kind = ("conv" if is_conv else "linear") if leaf == "kernel" else "id"
    return f"{name}.{_LEAF[leaf]}", kind


def offset_buffers(variables: Mapping[tuple[str, ...], Any]) -> dict[str, np.ndarray]:
    """Each CycleFC's `offset` buffer, as the original's gen_offset fills it, from the input
    channel count of its kernel [1, 1, in, out]."""
    buffers = {}
    for path, value in variables.items():
        if path[-1] == "kernel" and path[-2] in CYCLE_FC_EXTENTS:
            channels = value.shape[2]
            offsets = cycle_offsets(channels, CYCLE_FC_EXTENTS[path[-2]])
            key = original_key(path)[0][: -len("weight")] + "offset"
            buffers[key] = offsets.reshape(1, 2 * channels, 1, 1).astype(np.float32)
    return buffers


# timm does not define CycleMLP: the original code's layout, checked against twins in the tests.
register_converter(Converter("cyclemlp", original_key, timm_twin=False,
                             derived_buffers=offset_buffers), ("cyclemlp_b3",))
