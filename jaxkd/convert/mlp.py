"""timm <-> Flax layout of MLP-Mixer and ResMLP (the token-model renaming of `convert.vit`).

The stem conv is `stem.proj`; ResMLP's Affine `alpha`/`beta` and LayerScale `ls1`/`ls2` keep
timm's names and shapes. Google's `.npz` Mixers are read too (jaxkd.convert.layouts.MIXER_NPZ).
"""

from __future__ import annotations

from jaxkd.convert import layouts
from jaxkd.convert.core import Converter, register_converter
from jaxkd.convert.vit import token_model_key

register_converter(Converter("mlp", token_model_key, layouts=(layouts.MIXER_NPZ,)),
                   ("mixer_b16_224",))
register_converter(Converter("mlp", token_model_key), ("resmlp_12_224",))
