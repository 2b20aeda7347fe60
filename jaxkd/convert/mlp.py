"""timm <-> Flax layout of MLP-Mixer and ResMLP (the token-model renaming of `convert.vit`).

The stem conv is `stem.proj`; ResMLP's Affine `alpha`/`beta` and LayerScale `ls1`/`ls2` keep
timm's names and shapes.
"""

from __future__ import annotations

import numpy as np

from jaxkd.convert.vit import token_model_key

HEAD_PREFIX: tuple[str, ...] = ("head",)


def num_classes_of(state_dict: dict[str, np.ndarray]) -> int:
    return int(state_dict["head.weight"].shape[0])


def timm_key(path: tuple[str, ...]) -> tuple[str, str]:
    return token_model_key(path)
