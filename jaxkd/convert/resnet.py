"""timm ResNet state-dict layout for jaxkd.models.resnet (resnet18/34/50); torchvision's is the
same, and MoCo's query encoder is one (jaxkd.convert.layouts.MOCO).

Also holds `leaf_key`, the leaf naming every CNN converter shares.
"""

from __future__ import annotations

import re

from jaxkd.convert import layouts
from jaxkd.convert.core import Converter, register_converter

# Flax (collection, leaf) -> timm suffix for everything but kernels; all are stored as is.
_LEAF_SUFFIX = {("params", "bias"): "bias", ("params", "scale"): "weight",
                ("params", "gamma"): "gamma", ("batch_stats", "mean"): "running_mean",
                ("batch_stats", "var"): "running_var"}
_BLOCK = re.compile(r"layer(\d)_(\d+)")
_DOWNSAMPLE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def leaf_key(collection: str, leaf: str, kernel_layout: str) -> tuple[str, str]:
    """timm suffix and layout of one Flax leaf; `kernel_layout` is 'conv' or 'linear'."""
    if leaf == "kernel":
        return "weight", kernel_layout
    return _LEAF_SUFFIX[(collection, leaf)], "id"


def timm_key(path: tuple[str, ...]) -> tuple[str, str]:
    collection, *modules, leaf = path
    if modules == ["head"]:
        suffix, layout = leaf_key(collection, leaf, "linear")
        return f"fc.{suffix}", layout
    block = _BLOCK.fullmatch(modules[0])
    names = [f"layer{block[1]}.{block[2]}" if block else modules[0]]
    names += [_DOWNSAMPLE.get(m, m) for m in modules[1:]]
    suffix, layout = leaf_key(collection, leaf, "conv")
    return f"{'.'.join(names)}.{suffix}", layout


register_converter(Converter("resnet", timm_key, layouts=(layouts.MOCO,)),
                   ("resnet18", "resnet34", "resnet50"))
