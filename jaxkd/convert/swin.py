"""timm <-> Flax layout of Swin: the token-model renaming, with timm's head Linear at `head.fc`.

`relative_position_index` and `attn_mask` are derived buffers (recomputed in the Flax model).
"""

from __future__ import annotations

import numpy as np

from jaxkd.convert.vit import token_model_key

HEAD_PREFIX: tuple[str, ...] = ("head",)


def num_classes_of(state_dict: dict[str, np.ndarray]) -> int:
    return int(state_dict["head.fc.weight"].shape[0])


def timm_key(path: tuple[str, ...]) -> tuple[str, str]:
    key, kind = token_model_key(path)
    if path[1:2] == HEAD_PREFIX:  # timm's ClassifierHead wraps the Linear as head.fc
        key = "head.fc." + key[len("head."):]
    return key, kind
