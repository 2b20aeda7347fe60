"""Model registry: timm names -> Flax module builders plus the facts a trainer needs about each.

Every model's `apply(variables, images, train=...)` takes NHWC images that are already
normalised with the model's own mean/std and returns `(logits, features)`, where
`features['embedding']` is the pre-logits vector [B, D] and `features['stages']` the list of
the stage outputs (NHWC maps for CNNs and Swin, [B, L, C] token sequences otherwise): four for
the timm models, three or four for the 32 px CIFAR models of CRD's code base.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn

from jaxkd.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
# CIFAR-100's channel statistics as CRD's code base (RepDistiller) normalises with them.
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)

FAMILIES = ("cnn", "vit", "mlp")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the trainer and the converter need to know about a registered model (its checkpoint
    converter registers itself in jaxkd.convert)."""

    name: str
    family: str  # 'cnn' | 'vit' | 'mlp': picks the training recipe.
    builder: Callable[..., nn.Module]  # builder(num_classes=..., **timm_overrides) -> module
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    # The eval view of full-size images (timm 0.6.5's pretrained_cfg, which the official
    # code evaluates with): short side to floor(224 / eval_crop_pct), centre crop.
    eval_crop_pct: float = 0.875
    interpolation: str = "bicubic"
    # Whether OFA and PAT treat its stage features as tokens (ViT/MLP branches and aligners)
    # rather than CNN maps; a hierarchical MLP with conv-like stages (CycleMLP) is 'mlp' by
    # recipe but 'maps' by features, as the official OFA-KD code classifies it.
    token_stages: bool = True


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    *,
    family: str,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    input_size: int = 224,
    eval_crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    token_stages: bool | None = None,
):
    """Decorator registering `builder(num_classes=..., **overrides)` under a timm model name;
    `token_stages` defaults to every family but 'cnn'."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(
            name, family, builder, tuple(mean), tuple(std), input_size, eval_crop_pct,
            interpolation, family != "cnn" if token_stages is None else token_stages,
        )
        return builder

    return wrap


class UnknownModelError(ConfigError):
    pass


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; available models: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, *, num_classes: int = 1000, **overrides) -> nn.Module:
    """Builds a registered model; overrides use timm's keyword names (img_size, depth, ...)."""
    info = model_info(name)
    try:
        return info.builder(num_classes=num_classes, **overrides)
    except TypeError as e:
        raise ConfigError(f"bad overrides for model {name!r}: {e}") from None
