"""Stage features of exported models on held-out data, and linear CKA between two models' stages.

Used by scripts/cka.py to draw the teacher-vs-student CKA heatmaps of the papers' figures, and
by the trainer's optional CKA evaluation.
A model's layers are its stages (four for the timm models, three or four for the 32 px CIFAR
models) and its embedding, named by `layer_names`. Features are kept on the host, flattened per
example: memory is num_examples x the largest stage's size (512 examples of a 224 px ResNet
stage 1 are ~400 MB).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxkd import checkpoint, data, models
from jaxkd.analysis.cka import linear_cka
from jaxkd.errors import ConfigError


def layer_names(num_stages: int) -> tuple[str, ...]:
    """Names of a model's layers in feature order: stage1..stageN, then the embedding."""
    return (*(f"stage{i + 1}" for i in range(num_stages)), "embedding")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    name: str
    module: object
    variables: dict
    mean: np.ndarray
    std: np.ndarray


def load_export(path: str) -> LoadedModel:
    """A model export (jaxkd.checkpoint.save_model) with its registry normalisation."""
    variables, meta = checkpoint.load_model(path)
    name = meta["model_name"]
    module = models.create_model(name, num_classes=meta["num_classes"],
                                 **meta.get("overrides", {}))
    info = models.model_info(name)
    return LoadedModel(name, module, variables, np.asarray(info.mean, np.float32),
                       np.asarray(info.std, np.float32))


def _feature_fn(model: LoadedModel):
    @jax.jit
    def features(variables, images):
        _, out = model.module.apply(variables, (images - model.mean) / model.std, train=False)
        return [*out["stages"], out["embedding"]]

    return lambda images: features(model.variables, images)


def collect_layers(forward, batches, num_examples: int):
    """`forward(images)` returns a pytree of [B, ...] arrays (e.g. a list of layers per model);
    returns the same tree of float32 [n, D]: the first n <= num_examples rows with mask 1
    (padding rows dropped), flattened per example."""
    chunks, treedef = [], None
    seen = 0
    for batch in batches:
        keep = min(int(batch["mask"].sum()), num_examples - seen)
        if keep <= 0:
            break
        values, treedef = jax.tree.flatten(forward(batch["image"]))
        chunks.append([np.asarray(jax.device_get(v), np.float32)[:keep].reshape(keep, -1)
                       for v in values])
        seen += keep
    if treedef is None:
        raise ConfigError("no examples to compute features on: the split is empty or "
                          "num_examples is 0")
    return jax.tree.unflatten(treedef, [np.concatenate(layer) for layer in zip(*chunks)])


def collect_features(loaded: list[LoadedModel], dataset: str, *, image_size: int,
                     num_examples: int, batch_size: int = 64, data_dir: str | None = None
                     ) -> list[list[np.ndarray]]:
    """Per model, per layer (its `layer_names`): float32 [n, D] of the first
    n <= num_examples eval-split examples, all models on the same images."""
    forwards = [_feature_fn(m) for m in loaded]
    return collect_layers(lambda images: [f(images) for f in forwards],
                          data.open_dataset(dataset, data_dir).eval_batches(
                              global_batch_size=batch_size, image_size=image_size),
                          num_examples)


def cka_matrix(features_a: list[np.ndarray], features_b: list[np.ndarray]) -> np.ndarray:
    """[len(a), len(b)] linear CKA between every layer of a and every layer of b."""
    return np.array([[float(linear_cka(a, b)) for b in features_b] for a in features_a])
