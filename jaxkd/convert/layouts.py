"""Checkpoint layouts other than timm's own, each normalised to timm 1.0's state-dict keys.

Teachers come in the layout of whatever code saved them: timm 0.6.5 and Microsoft's Swin
(patch merging at the end of each stage), Facebook's ConvNeXt release, Google's ViT/Mixer
`.npz` files (vit_jax and big_vision naming), MoCo's query encoder. Each `Layout` recognises its
files from their keys alone (`claims`) and renames/reshapes them into timm 1.0's keys and
PyTorch array layouts (`normalise`); jaxkd.convert.core then does its strict accounting on the
result. A layout's `claims` looks only at keys no timm 1.0 state dict of the same models has,
so the layouts registered for one model never claim the same file.

Nothing is dropped without saying so: keys a layout deliberately does not convert (a MoCo
projection head, its momentum encoder) are returned in `Normalised.left_out` with the reason.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection

import numpy as np


class LayoutError(ValueError):
    """A checkpoint whose keys cannot be normalised (two of them become the same timm key)."""


@dataclasses.dataclass
class Normalised:
    """A checkpoint in timm 1.0's keys."""

    state_dict: dict[str, np.ndarray]
    # timm key -> the checkpoint key(s) it was made from, for error messages.
    sources: dict[str, str]
    # reason -> checkpoint keys deliberately not converted.
    left_out: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def source(self, key: str) -> str:
        return self.sources.get(key, key)

    def add(self, key: str, value: np.ndarray, source: str) -> None:
        """Stores `value` under timm key `key`; `source` is its key in the checkpoint."""
        if key in self.state_dict:
            raise LayoutError(f"checkpoint keys {self.source(key)!r} and {source!r} both "
                              f"become {key!r}")
        self.state_dict[key] = value
        if source != key:
            self.sources[key] = source


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    claims: Callable[[Collection[str]], bool]
    normalise: Callable[[dict[str, np.ndarray]], Normalised]
    # The layout has no classifier (a self-supervised backbone): converted with num_classes 0.
    headless: bool = False


def _identity(state_dict: dict[str, np.ndarray]) -> Normalised:
    return Normalised(dict(state_dict), {})


# timm's own keys (what timm >= 0.9 saves; for every model but Swin also what 0.6.5 saved):
# the layout a checkpoint is read in when no other layout claims it.
TIMM = Layout("timm", claims=lambda keys: True, normalise=_identity)
# The same keys for models timm lacks: the layout of the code that defines them (RepDistiller's
# CIFAR models, OFA-KD's MLP students).
ORIGINAL = Layout("original", claims=lambda keys: True, normalise=_identity)


def _renamed(state_dict: dict[str, np.ndarray], rename: Callable[[str], str]) -> Normalised:
    out = Normalised({}, {})
    for key, value in state_dict.items():
        out.add(rename(key), value, key)
    return out


# ------------------------------------------------------------------------------------------ Swin

_SWIN_V1_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def _swin_v1_key(key: str) -> str:
    """Patch merging at the end of stage i is timm 1.0's at the start of stage i + 1, and the
    classifier Linear sits inside timm 1.0's ClassifierHead (timm's checkpoint_filter_fn)."""
    key = _SWIN_V1_DOWNSAMPLE.sub(lambda m: f"layers.{int(m[1]) + 1}.downsample.", key)
    return "head.fc." + key[len("head."):] if key.startswith("head.") else key


SWIN_V1 = Layout(
    "timm 0.6.5 / Microsoft Swin (patch merging at the end of each stage, classifier 'head')",
    # timm 1.0's first stage has no patch merging; the original code's always has one.
    claims=lambda keys: "layers.0.downsample.reduction.weight" in keys,
    normalise=lambda sd: _renamed(sd, _swin_v1_key),
)


# -------------------------------------------------------------------------------------- ConvNeXt

_FB_CONVNEXT_RULES = (  # applied in order, as timm's convnext.checkpoint_filter_fn does
    (re.compile(r"^downsample_layers\.0\."), "stem."),
    (re.compile(r"^downsample_layers\.(\d+)\.(\d+)\."), r"stages.\1.downsample.\2."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\."), r"stages.\1.blocks.\2."),
    (re.compile(r"\.dwconv\."), ".conv_dw."),
    (re.compile(r"\.pwconv(\d)\."), r".mlp.fc\1."),
    (re.compile(r"^head\."), "head.fc."),
    (re.compile(r"^norm\."), "head.norm."),
)


def _fb_convnext_key(key: str) -> str:
    for pattern, replacement in _FB_CONVNEXT_RULES:
        key = pattern.sub(replacement, key)
    return key


FB_CONVNEXT = Layout(
    "Facebook ConvNeXt release (downsample_layers, stages.i.j.dwconv/pwconv, norm, head)",
    claims=lambda keys: "downsample_layers.0.0.weight" in keys,
    normalise=lambda sd: _renamed(sd, _fb_convnext_key),
)


# ---------------------------------------------------------------------------------------- ResNet

_MOCO_PARTS = (  # (pattern, reason it is left out, or None for the backbone)
    (re.compile(r"^(module\.)?encoder_q\.fc\."), "projection MLP (not a classifier)"),
    (re.compile(r"^(module\.)?encoder_k\."), "momentum (key) encoder"),
    (re.compile(r"^(module\.)?queue(_ptr)?$"), "queue of negatives"),
    (re.compile(r"^(module\.)?encoder_q\."), None),
)


def _moco(state_dict: dict[str, np.ndarray]) -> Normalised:
    """The query encoder's torchvision ResNet (timm's keys), without MoCo's training parts."""
    out = Normalised({}, {})
    for key, value in state_dict.items():
        for pattern, reason in _MOCO_PARTS:
            if match := pattern.match(key):
                if reason is None:
                    out.add(key[match.end():], value, key)
                else:
                    out.left_out.setdefault(reason, []).append(key)
                break
        else:
            out.add(key, value, key)  # not MoCo's: the accounting reports it
    return out


MOCO = Layout(
    "MoCo v1/v2 (module.encoder_q.*): backbone and embedding, no classifier",
    claims=lambda keys: any(re.match(r"^(module\.)?encoder_q\.", key) for key in keys),
    normalise=_moco,
    headless=True,
)


# ----------------------------------------------------------------------------- Google .npz files

_NPZ_PREFIXES = ("", "params/", "opt/target/")  # plain, big_vision, vit_jax with optimiser


def _npz_prefix(keys: Collection[str], *anchors: str) -> str | None:
    """The prefix under which every anchor key of a Flax parameter tree is stored, if any."""
    for prefix in _NPZ_PREFIXES:
        if all(prefix + anchor in keys for anchor in anchors):
            return prefix
    return None


def _torch_array(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """A Flax leaf as PyTorch stores it: conv kernels HWIO -> OIHW, Dense kernels transposed
    (attention's output kernel [heads, head_dim, out] as a Linear [out, heads * head_dim])."""
    if leaf != "kernel":
        return {"scale": "weight"}.get(leaf, leaf), value
    if value.ndim == 4:
        return "weight", value.transpose(3, 2, 0, 1)
    return "weight", value.reshape(-1, value.shape[-1]).T


class _NpzTree:
    """Builds a timm state dict from a Flax parameter tree stored with '/'-joined keys."""

    def __init__(self, state_dict: dict[str, np.ndarray], prefix: str):
        self.arrays, self.prefix = state_dict, prefix
        self.out = Normalised({}, {})
        self.used: set[str] = set()

    def has(self, path: str) -> bool:
        return self.prefix + path in self.arrays

    def take(self, path: str, index: int | None = None) -> np.ndarray:
        key = self.prefix + path
        self.used.add(key)
        value = self.arrays[key]
        return value if index is None else value[index]

    def put(self, timm_key: str, value: np.ndarray, *paths: str) -> None:
        self.out.add(timm_key, np.ascontiguousarray(value),
                     " + ".join(self.prefix + p for p in paths))

    def module(self, timm_name: str, path: str, index: int | None = None) -> None:
        """Every leaf (kernel/scale/bias) stored under `path` -> `timm_name.weight/bias`."""
        leaves = [k[len(self.prefix + path) + 1:] for k in self.arrays
                  if k.startswith(f"{self.prefix}{path}/")]
        for leaf in leaves:
            if "/" in leaf:
                continue  # a submodule, mapped by its own call
            suffix, value = _torch_array(leaf, self.take(f"{path}/{leaf}", index))
            self.put(f"{timm_name}.{suffix}", value, f"{path}/{leaf}")

    def normalised(self) -> Normalised:
        """The converted keys; keys not consumed pass through for the accounting to report."""
        for key, value in self.arrays.items():
            if key not in self.used:
                self.out.add(key, value, key)
        return self.out


_VIT_ANCHORS = ("embedding/kernel", "Transformer/encoder_norm/scale")
_VIT_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")


def _vit_npz(state_dict: dict[str, np.ndarray]) -> Normalised:
    """google-research/vision_transformer and big_vision ViTs, as timm's `_load_weights` reads
    them: per-block `encoderblock_{i}` or one scanned `encoderblock` stacked over depth, module
    numbering from the pre-linen (MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3) or
    the linen code (_0, _1, _0)."""
    prefix = _npz_prefix(state_dict, *_VIT_ANCHORS)
    tree = _NpzTree(state_dict, prefix)
    keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    tree.module("patch_embed.proj", "embedding")
    tree.module("norm", "Transformer/encoder_norm")
    tree.module("head", "head")
    if "cls" in keys:
        tree.put("cls_token", tree.take("cls"), "cls")
    for pos in ("pos_embedding", "Transformer/posembed_input/pos_embedding"):
        if pos in keys:
            tree.put("pos_embed", tree.take(pos), pos)
    if "Transformer/encoderblock/LayerNorm_0/scale" in keys:  # scanned: [depth, ...] arrays
        depth = tree.arrays[prefix + "Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        blocks = [("Transformer/encoderblock", i) for i in range(depth)]
    else:
        indices = sorted({int(m[1]) for k in keys if (m := _VIT_BLOCK.match(k))})
        blocks = [(f"Transformer/encoderblock_{i}", None) for i in indices]
    pre_linen = any("/MultiHeadDotProductAttention_1/" in k for k in keys)
    attn, norm2, mlp = (("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
                        if pre_linen else ("MultiHeadDotProductAttention_0", "LayerNorm_1",
                                           "MlpBlock_0"))
    for i, (block, index) in enumerate(blocks):
        timm_block = f"blocks.{i}"
        tree.module(f"{timm_block}.norm1", f"{block}/LayerNorm_0", index)
        tree.module(f"{timm_block}.norm2", f"{block}/{norm2}", index)
        tree.module(f"{timm_block}.mlp.fc1", f"{block}/{mlp}/Dense_0", index)
        tree.module(f"{timm_block}.mlp.fc2", f"{block}/{mlp}/Dense_1", index)
        tree.module(f"{timm_block}.attn.proj", f"{block}/{attn}/out", index)
        # The q, k, v kernels [D, heads, head_dim] become one [3D, D] Linear.
        qkv = [f"{block}/{attn}/{part}/{leaf}" for leaf in ("kernel", "bias")
               for part in ("query", "key", "value")]
        if all(tree.has(p) for p in qkv):
            kernels = [tree.take(p, index) for p in qkv[:3]]
            biases = [tree.take(p, index) for p in qkv[3:]]
            tree.put(f"{timm_block}.attn.qkv.weight",
                     np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels]), *qkv[:3])
            tree.put(f"{timm_block}.attn.qkv.bias",
                     np.concatenate([b.reshape(-1) for b in biases]), *qkv[3:])
    return tree.normalised()


VIT_NPZ = Layout(
    "Google ViT .npz (vision_transformer / big_vision naming)",
    claims=lambda keys: _npz_prefix(keys, *_VIT_ANCHORS) is not None,
    normalise=_vit_npz,
)


_MIXER_ANCHORS = ("stem/kernel", "pre_head_layer_norm/scale")
_MIXER_BLOCK = re.compile(r"^MixerBlock_(\d+)/")
_MIXER_BLOCK_PARTS = (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1"),
                      ("mlp_tokens.fc1", "token_mixing/Dense_0"),
                      ("mlp_tokens.fc2", "token_mixing/Dense_1"),
                      ("mlp_channels.fc1", "channel_mixing/Dense_0"),
                      ("mlp_channels.fc2", "channel_mixing/Dense_1"))


def _mixer_npz(state_dict: dict[str, np.ndarray]) -> Normalised:
    """google-research/vision_transformer's (and big_vision's) MlpMixer parameter names."""
    prefix = _npz_prefix(state_dict, *_MIXER_ANCHORS)
    tree = _NpzTree(state_dict, prefix)
    tree.module("stem.proj", "stem")
    tree.module("norm", "pre_head_layer_norm")
    tree.module("head", "head")
    for i in sorted({int(m[1]) for k in state_dict if (m := _MIXER_BLOCK.match(k[len(prefix):]))}):
        for timm_name, path in _MIXER_BLOCK_PARTS:
            tree.module(f"blocks.{i}.{timm_name}", f"MixerBlock_{i}/{path}")
    return tree.normalised()


MIXER_NPZ = Layout(
    "Google MLP-Mixer .npz (vision_transformer / big_vision naming)",
    claims=lambda keys: _npz_prefix(keys, *_MIXER_ANCHORS) is not None,
    normalise=_mixer_npz,
)
