"""State-dict layouts of CRD's 32 px CIFAR models (RepDistiller, URepDistiller) for
jaxkd.models.cifar_resnet, .wrn and .vgg: one layout per family, named in the registry as
`cifar:<layout>`.

Their published teachers are `{'model': state_dict, ...}` files, which
jaxkd.convert.read_state_dict unwraps. The CIFAR ResNets keep timm's ResNet keys (`conv1`,
`bn1`, `layer{s}.{i}.conv1/bn1/conv2/bn2/downsample.0/downsample.1`, `fc`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from jaxkd.convert import resnet as timm_resnet
from jaxkd.convert.core import ConversionError
from jaxkd.convert.resnet import leaf_key

_WRN_BLOCK = re.compile(r"block(\d)_(\d+)")
_WRN_PARTS = {"conv_shortcut": "convShortcut"}
_VGG_LAYER = re.compile(r"block(\d)_(conv|bn)(\d+)")
# Within a VGG block each conv is followed by its BN and a ReLU: entries 3j and 3j + 1.
_VGG_OFFSET = {"conv": 0, "bn": 1}


@dataclasses.dataclass(frozen=True)
class Layout:
    """What jaxkd.convert.core asks of a family: its head, class count and key mapping."""

    description: str
    head_key: str  # the classifier Linear in the state dict
    timm_key: Callable[[tuple[str, ...]], tuple[str, str]]
    HEAD_PREFIX: tuple[str, ...] = ("head",)
    TIMM_TWIN: bool = False  # timm has no such model (its vgg13 is ImageNet's)

    def num_classes_of(self, state_dict: dict[str, np.ndarray]) -> int:
        weight = f"{self.head_key}.weight"
        if weight not in state_dict:
            raise ConversionError(f"not a {self.description} state dict: it has no {weight!r}")
        return int(state_dict[weight].shape[0])


def _head_key(head: str, collection: str, leaf: str) -> tuple[str, str]:
    suffix, layout = leaf_key(collection, leaf, "linear")
    return f"{head}.{suffix}", layout


def _wrn_key(path: tuple[str, ...]) -> tuple[str, str]:
    collection, *modules, leaf = path
    if modules == ["head"]:
        return _head_key("fc", collection, leaf)
    block = _WRN_BLOCK.fullmatch(modules[0])
    names = [f"block{block[1]}.layer.{block[2]}" if block else modules[0]]
    names += [_WRN_PARTS.get(m, m) for m in modules[1:]]
    suffix, layout = leaf_key(collection, leaf, "conv")
    return f"{'.'.join(names)}.{suffix}", layout


def _vgg_key(path: tuple[str, ...]) -> tuple[str, str]:
    collection, *modules, leaf = path
    if modules == ["head"]:
        return _head_key("classifier", collection, leaf)
    block, kind, index = _VGG_LAYER.fullmatch(modules[0]).groups()
    suffix, layout = leaf_key(collection, leaf, "conv")
    return f"block{block}.{3 * int(index) + _VGG_OFFSET[kind]}.{suffix}", layout


resnet = Layout("CIFAR ResNet (RepDistiller)", "fc", timm_resnet.timm_key)
wrn = Layout("wide ResNet (RepDistiller)", "fc", _wrn_key)
vgg = Layout("CIFAR VGG (RepDistiller)", "classifier", _vgg_key)
