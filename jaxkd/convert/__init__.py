"""timm checkpoints <-> Flax variables: readers for checkpoint files and strict conversion."""

from jaxkd.convert.core import ConversionError, flax_to_timm, timm_to_flax
from jaxkd.convert.readers import CheckpointReadError, read_state_dict, state_dict_from_timm_model

__all__ = ["CheckpointReadError", "ConversionError", "flax_to_timm", "read_state_dict",
           "state_dict_from_timm_model", "timm_to_flax"]
