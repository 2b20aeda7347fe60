"""State-dict layout of HireMLP as OFA-KD's custom_model/hire_mlp.py names it, for
jaxkd.models.hiremlp: `patch_embed.proj/norm`, `network.{2i}.{j}` (block j of stage i:
`norm1`, `attn.mlp_h1/mlp_h1_norm/mlp_h2/mlp_w1/mlp_w1_norm/mlp_w2/mlp_c/reweight.fc1/fc2/proj`,
`norm2`, `mlp.fc1/fc2`), `network.{2i+1}.proj/norm` (downsampling), `norm`, `head`.

Every conv (1x1 ones included) is OIHW; only `head` is a Linear.
"""

from __future__ import annotations

import re

from jaxkd.convert.core import Converter, register_converter
from jaxkd.convert.resnet import leaf_key

_NETWORK = re.compile(r"network_(\d+)(?:_(\d+))?")


def hiremlp_key(path: tuple[str, ...]) -> tuple[str, str]:
    collection, *modules, leaf = path
    if modules == ["head"]:
        suffix, layout = leaf_key(collection, leaf, "linear")
        return f"head.{suffix}", layout
    entry = _NETWORK.fullmatch(modules[0])
    if entry:
        modules[0] = ".".join(["network", *(index for index in entry.groups() if index)])
    suffix, layout = leaf_key(collection, leaf, "conv")
    return f"{'.'.join(modules)}.{suffix}", layout


# timm has no HireMLP: the tests check the conversion against a PyTorch twin of the original.
register_converter(Converter("hiremlp", hiremlp_key, timm_twin=False), ("hire_mlp_small",))
