"""timm <-> Flax layout of ViT/DeiT, and the renaming rule the token-model families share.

The Flax modules mirror timm's module tree, so a key is the Flax path with list entries
(`blocks_3`) written as timm's (`blocks.3`) and Flax leaf names as PyTorch's. Only the patch
embedding is a conv; every other kernel is a Linear. Google's `.npz` ViTs are read too
(jaxkd.convert.layouts.VIT_NPZ); DeiT's releases are timm state dicts under 'model'.
"""

from __future__ import annotations

import re

from jaxkd.convert import layouts
from jaxkd.convert.core import Converter, register_converter

_LIST_ENTRY = re.compile(r"^(blocks|layers)_(\d+)$")
_PATCH_EMBEDS = ("patch_embed", "stem")


def token_model_key(path: tuple[str, ...]) -> tuple[str, str]:
    """Key and layout for a ('params', module, ..., leaf) path of a ViT/Swin/Mixer-style model."""
    if len(path) < 2 or path[0] != "params":
        raise ValueError(f"token models only have 'params' variables, got {'/'.join(path)}")
    modules = [_LIST_ENTRY.sub(r"\1.\2", m) for m in path[1:-1]]
    leaf = path[-1]
    kind = "id"
    if leaf == "kernel":
        is_patch_conv = len(modules) >= 2 and modules[-2] in _PATCH_EMBEDS and modules[-1] == "proj"
        kind = "conv" if is_patch_conv else "linear"
        leaf = "weight"
    elif leaf == "scale":  # LayerNorm
        leaf = "weight"
    return ".".join(modules + [leaf]), kind


register_converter(Converter("vit", token_model_key, layouts=(layouts.VIT_NPZ,)),
                   ("deit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"))
