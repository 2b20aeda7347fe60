"""timm MobileNetV2 (EfficientNet builder) state-dict layout for jaxkd.models.mobilenetv2."""

from __future__ import annotations

import re

from jaxkd.convert.core import Converter, register_converter
from jaxkd.convert.resnet import leaf_key

_BLOCK = re.compile(r"blocks_(\d+)_(\d+)")


def timm_key(path: tuple[str, ...]) -> tuple[str, str]:
    collection, *modules, leaf = path
    if modules == ["head"]:
        suffix, layout = leaf_key(collection, leaf, "linear")
        return f"classifier.{suffix}", layout
    block = _BLOCK.fullmatch(modules[0])
    names = [f"blocks.{block[1]}.{block[2]}" if block else modules[0], *modules[1:]]
    suffix, layout = leaf_key(collection, leaf, "conv")
    return f"{'.'.join(names)}.{suffix}", layout


register_converter(Converter("mobilenetv2", timm_key), ("mobilenetv2_100",))
