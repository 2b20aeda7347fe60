"""timm MobileNetV2 (EfficientNet builder) state-dict layout for jaxkd.models.mobilenetv2."""

from __future__ import annotations

import re

import numpy as np

from jaxkd.convert.core import ConversionError
from jaxkd.convert.resnet import leaf_key

HEAD_PREFIX = ("head",)

_BLOCK = re.compile(r"blocks_(\d+)_(\d+)")


def num_classes_of(state_dict: dict[str, np.ndarray]) -> int:
    if "classifier.weight" not in state_dict:
        raise ConversionError("not a timm MobileNetV2 state dict: it has no 'classifier.weight'")
    return int(state_dict["classifier.weight"].shape[0])


def timm_key(path: tuple[str, ...]) -> tuple[str, str]:
    collection, *modules, leaf = path
    if modules == ["head"]:
        suffix, layout = leaf_key(collection, leaf, "linear")
        return f"classifier.{suffix}", layout
    block = _BLOCK.fullmatch(modules[0])
    names = [f"blocks.{block[1]}.{block[2]}" if block else modules[0], *modules[1:]]
    suffix, layout = leaf_key(collection, leaf, "conv")
    return f"{'.'.join(names)}.{suffix}", layout
