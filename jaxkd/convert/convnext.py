"""timm ConvNeXt state-dict layout for jaxkd.models.convnext; Facebook's original release is
read too (jaxkd.convert.layouts.FB_CONVNEXT)."""

from __future__ import annotations

import re

from jaxkd.convert import layouts
from jaxkd.convert.core import Converter, register_converter
from jaxkd.convert.resnet import leaf_key

# Flax module name -> (timm module name, layout of its kernel if it has one).
_STEM = {"stem_0": ("stem.0", "conv"), "stem_1": ("stem.1", None),
         "head_norm": ("head.norm", None), "head": ("head.fc", "linear")}
_DOWNSAMPLE = re.compile(r"stages_(\d+)_downsample_(\d)")
_BLOCK = re.compile(r"stages_(\d+)_blocks_(\d+)")
_BLOCK_PARTS = {"conv_dw": ("conv_dw", "conv"), "norm": ("norm", None),
                "mlp_fc1": ("mlp.fc1", "linear"), "mlp_fc2": ("mlp.fc2", "linear")}


def timm_key(path: tuple[str, ...]) -> tuple[str, str]:
    collection, *modules, leaf = path
    top = modules[0]
    if top in _STEM:
        name, kernel_layout = _STEM[top]
    elif downsample := _DOWNSAMPLE.fullmatch(top):
        name = f"stages.{downsample[1]}.downsample.{downsample[2]}"
        kernel_layout = "conv"  # index 0 is the LayerNorm2d, which has no kernel
    else:
        block = _BLOCK.fullmatch(top)
        name = f"stages.{block[1]}.blocks.{block[2]}"
        if len(modules) > 1:  # the layer-scale `gamma` is a leaf of the block itself
            part, kernel_layout = _BLOCK_PARTS[modules[1]]
            name = f"{name}.{part}"
        else:
            kernel_layout = None
    suffix, layout = leaf_key(collection, leaf, kernel_layout)
    return f"{name}.{suffix}", layout


register_converter(Converter("convnext", timm_key, layouts=(layouts.FB_CONVNEXT,)),
                   ("convnext_tiny",))
