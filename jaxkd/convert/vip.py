"""State-dict layout of OFA-KD's Vision Permutator (custom_model/vip.py of Hao840/OFAKD).

The token-model renaming of `convert.vit`, with the original's `network` list: Flax's
`network_{entry}_{block}` is `network.<entry>.<block>` (a Permutator block) and
`network_{entry}` is `network.<entry>` (a Downsample, whose `proj` is a conv like the patch
embedding's). There are no buffers.
"""

from __future__ import annotations

import re

from jaxkd.convert.core import Converter, register_converter
from jaxkd.convert.vit import token_model_key

_NETWORK_ENTRY = re.compile(r"network_(\d+)(?:_(\d+))?")


def vip_key(path: tuple[str, ...]) -> tuple[str, str]:
    key, kind = token_model_key(path)
    entry = _NETWORK_ENTRY.fullmatch(path[1]) if len(path) > 2 else None
    if entry is None:
        return key, kind
    entry_key = ".".join(["network", *(g for g in entry.groups() if g is not None)])
    if entry[2] is None and path[-1] == "kernel":  # a Downsample's conv
        kind = "conv"
    return entry_key + key[len(path[1]):], kind


register_converter(Converter("vip", vip_key, timm_twin=False), ("vip_s7",))
