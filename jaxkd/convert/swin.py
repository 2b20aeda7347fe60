"""timm <-> Flax layout of Swin: the token-model renaming, with timm's head Linear at `head.fc`.

`relative_position_index` and `attn_mask` are derived buffers (recomputed in the Flax model).
timm 0.6.5's and Microsoft's original layout, in which the official teachers are saved, is read
too (jaxkd.convert.layouts.SWIN_V1).
"""

from __future__ import annotations

from jaxkd.convert import layouts
from jaxkd.convert.core import Converter, register_converter
from jaxkd.convert.vit import token_model_key


def timm_key(path: tuple[str, ...]) -> tuple[str, str]:
    key, kind = token_model_key(path)
    if path[1:2] == ("head",):  # timm's ClassifierHead wraps the Linear as head.fc
        key = "head.fc." + key[len("head."):]
    return key, kind


register_converter(Converter("swin", timm_key, layouts=(layouts.SWIN_V1,)),
                   ("swin_tiny_patch4_window7_224", "swin_nano_patch4_window7_224",
                    "swin_pico_patch4_window7_224"))
