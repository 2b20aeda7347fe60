"""Flax models with timm names; importing this package registers every family."""

from jaxkd.models import convnext, mlp, mobilenetv2, resnet, swin, vit  # noqa: F401  (register)
from jaxkd.models.registry import (ModelInfo, UnknownModelError, create_model, list_models,
                                   model_info, register_model)

__all__ = ["ModelInfo", "UnknownModelError", "create_model", "list_models", "model_info",
           "register_model"]
