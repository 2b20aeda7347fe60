"""Building the models of a run: the student, and the frozen teacher from its export."""

from __future__ import annotations

import dataclasses
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import checkpoint, distill, models
from jaxkd.errors import CheckpointError, ConfigError

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelHandle:
    """A built model with its normalisation constants."""

    name: str
    module: nn.Module
    mean: np.ndarray
    std: np.ndarray
    overrides: dict
    num_classes: int

    def normalize(self, images):
        return (images - self.mean.astype(images.dtype)) / self.std.astype(images.dtype)


def compute_dtype(config):
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                          f"got {config.compute_dtype!r}")
    return COMPUTE_DTYPES[config.compute_dtype]


def model_overrides(model_config) -> dict:
    """Model overrides in their JSON form (tuples as lists), as checkpoints record them."""
    return json.loads(json.dumps(dict(model_config.get("overrides", {}) or {})))


def build_model(model_config, num_classes: int, dtype) -> ModelHandle:
    info = models.model_info(model_config.name)
    overrides = model_overrides(model_config)
    module = models.create_model(model_config.name, num_classes=num_classes, dtype=dtype,
                                 **overrides)
    return ModelHandle(model_config.name, module, np.asarray(info.mean, np.float32),
                       np.asarray(info.std, np.float32), overrides, num_classes)


def eval_view(name: str):
    """How model `name` is evaluated on full-size images (a data.EvalView): its registry entry
    (timm 0.6.5's pretrained_cfg). The data layer (TensorFlow) is imported only here: the
    model and step paths run where TensorFlow is not installed."""
    from jaxkd import data

    info = models.model_info(name)
    return data.EvalView(info.eval_crop_pct, info.interpolation)


def model_spec(handle: ModelHandle, image_size: int) -> distill.ModelSpec:
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)

    def forward(x):
        variables = handle.module.init(jax.random.PRNGKey(0), x, train=False)
        return handle.module.apply(variables, x, train=False)

    try:
        _, features = jax.eval_shape(forward, images)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model {handle.name!r} cannot take {image_size}px images: {e}") from None
    return distill.ModelSpec(
        name=handle.name, num_classes=handle.num_classes,
        embed_dim=features["embedding"].shape[-1],
        stage_shapes=tuple(tuple(s.shape[1:]) for s in features["stages"]),
        token_stages=models.model_info(handle.name).token_stages)


def check_variables(expected, actual, what: str) -> None:
    """Raises one error listing every missing, unexpected or mis-shaped variable."""
    want = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected), sep="/")
    have = flax.traverse_util.flatten_dict(flax.core.unfreeze(actual), sep="/")
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = sorted(f"{k}: checkpoint {tuple(np.shape(have[k]))}, model {tuple(want[k].shape)}"
                    for k in set(want) & set(have) if tuple(np.shape(have[k])) != want[k].shape)
    if missing or unexpected or shapes:
        lines = [f"{what} does not match its model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                lines.append(f"  {title}: " + ", ".join(items[:20]) +
                             (f" ... ({len(items)} in all)" if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))


def load_teacher(config, num_classes: int, image_size: int, dtype, *, needs_logits: bool):
    """Builds the teacher and loads its export; returns (handle, variables). A headless export
    (0 classes: a self-supervised backbone) serves methods that read no teacher logits."""
    tcfg = config.teacher
    if not tcfg.get("name"):
        raise ConfigError(f"method {config.method.name!r} needs config.teacher.name")
    if not tcfg.get("checkpoint"):
        raise ConfigError(f"teacher {tcfg.name!r} needs config.teacher.checkpoint: a model "
                          "export (a supervised run's <workdir>/export or the output of "
                          "scripts/convert_timm.py)")
    variables, meta = checkpoint.load_model(tcfg.checkpoint)
    overrides = model_overrides(tcfg)
    headless = meta.get("num_classes") == 0
    if headless and needs_logits:
        raise ConfigError(
            f"teacher checkpoint {tcfg.checkpoint!r} is a backbone without a classifier head "
            f"(0 classes), but method {config.method.name!r} reads the teacher's logits; use "
            "a method that distills features only (coss), or a teacher with a head")
    teacher_classes = 0 if headless else num_classes
    if meta.get("model_name") != tcfg.name or meta.get("num_classes") != teacher_classes or \
            meta.get("overrides", {}) != overrides:
        raise CheckpointError(
            f"teacher checkpoint {tcfg.checkpoint!r} holds {meta.get('model_name')!r} with "
            f"{meta.get('num_classes')} classes and overrides {meta.get('overrides')}, but the "
            f"config asks for {tcfg.name!r} with {num_classes} classes and overrides {overrides}")
    handle = build_model(tcfg, teacher_classes, dtype)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    try:
        expected = jax.eval_shape(lambda x: handle.module.init(jax.random.PRNGKey(0), x), x)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"teacher {tcfg.name!r} cannot take {image_size}px images: {e}"
                          ) from None
    check_variables(expected, variables, f"teacher checkpoint {tcfg.checkpoint!r}")
    return handle, variables
