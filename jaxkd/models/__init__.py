"""Flax models with timm names (and CRD's names for its 32 px CIFAR models); importing this
package registers every family."""

from jaxkd.models import (  # noqa: F401  (register)
    cifar_resnet, convnext, cyclemlp, hiremlp, mlp, mobilenetv2, resnet, swin, vgg, vip,
    vit, wrn)
from jaxkd.models.registry import (ModelInfo, UnknownModelError, create_model, list_models,
                                   model_info, register_model)

__all__ = ["ModelInfo", "UnknownModelError", "create_model", "list_models", "model_info",
           "register_model"]
