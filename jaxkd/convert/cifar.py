"""State-dict layouts of CRD's 32 px CIFAR models (RepDistiller, URepDistiller) for
jaxkd.models.cifar_resnet, .wrn and .vgg: one converter per family, registered with its
models.

Their published teachers are `{'model': state_dict, ...}` files, which
jaxkd.convert.read_state_dict unwraps. The CIFAR ResNets keep timm's ResNet keys (`conv1`,
`bn1`, `layer{s}.{i}.conv1/bn1/conv2/bn2/downsample.0/downsample.1`, `fc`).
"""

from __future__ import annotations

import re

from jaxkd.convert import resnet as timm_resnet
from jaxkd.convert.core import Converter, register_converter
from jaxkd.convert.resnet import leaf_key

_WRN_BLOCK = re.compile(r"block(\d)_(\d+)")
_WRN_PARTS = {"conv_shortcut": "convShortcut"}
_VGG_LAYER = re.compile(r"block(\d)_(conv|bn)(\d+)")
# Within a VGG block each conv is followed by its BN and a ReLU: entries 3j and 3j + 1.
_VGG_OFFSET = {"conv": 0, "bn": 1}


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


# timm has no twin of these models to check a conversion against (its vgg13 is ImageNet's).
register_converter(Converter("cifar_resnet", timm_resnet.timm_key, timm_twin=False),
                   ("resnet20", "resnet56", "resnet110", "resnet8x4", "resnet32x4"))
register_converter(Converter("wrn", _wrn_key, timm_twin=False), ("wrn_40_2", "wrn_16_2"))
register_converter(Converter("cifar_vgg", _vgg_key, timm_twin=False), ("vgg8", "vgg13"))
