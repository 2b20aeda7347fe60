"""Checkpoints of any layout jaxkd reads <-> Flax variables: file readers, layout detection
and strict conversion. Importing the package registers every family's converter."""

from jaxkd.convert.core import (Conversion, ConversionError, Converter, apply_converted,
                                convert_checkpoint, converter_for, flax_to_timm,
                                register_converter, timm_to_flax)
from jaxkd.convert.readers import CheckpointReadError, read_state_dict, state_dict_from_timm_model
# Each family module registers its converter on import.
from jaxkd.convert import (  # noqa: F401,E402
    cifar, convnext, cyclemlp, hiremlp, mlp, mobilenetv2, resnet, swin, vip, vit)

__all__ = ["CheckpointReadError", "Conversion", "ConversionError", "Converter",
           "apply_converted", "convert_checkpoint", "converter_for", "flax_to_timm",
           "read_state_dict", "register_converter", "state_dict_from_timm_model", "timm_to_flax"]
