"""Checks of a run config before anything is built: its fields, values and durations, and
the metadata a train checkpoint records so that a resume with another config is refused."""

from __future__ import annotations

import difflib
import math

import jax
import ml_collections

from jaxkd import distill, recipes
from jaxkd.build import model_overrides
from jaxkd.errors import ConfigError


def resolve_durations(config, num_train_examples: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps); `total_steps` > 0 overrides `num_epochs`."""
    steps_per_epoch = max(num_train_examples // config.batch_size, 1)
    total = config.get("total_steps", 0) or int(math.ceil(config.num_epochs * steps_per_epoch))
    if total <= 0:
        raise ConfigError("set config.num_epochs or config.total_steps to a positive value")
    return steps_per_epoch, total


# Sections that check their own fields (a method's, the augmentations) or hold a model's
# keyword arguments.
_SELF_CHECKED_FIELDS = ("method", "augment", "student.overrides", "teacher.overrides",
                        "population.sweep")


def check_config_fields(config) -> None:
    """Refuses fields that base_config lacks: a typo in a config file (`c.lable_smoothing = 0.1`)
    adds a field that nothing reads."""
    unknown = []

    def walk(section, reference, prefix):
        for key, value in section.items():
            path = prefix + key
            if key not in reference:
                close = difflib.get_close_matches(key, list(reference), n=1)
                unknown.append(path + (f" (did you mean {prefix + close[0]}?)" if close else ""))
            elif (path not in _SELF_CHECKED_FIELDS and hasattr(value, "items") and
                  isinstance(reference[key], ml_collections.ConfigDict)):
                walk(value, reference[key], path + ".")

    walk(config, recipes.base_config(), "")
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}; "
                          "jaxkd.recipes.base_config lists the fields the trainer reads")


def check_batch_size(config, mesh):
    if config.batch_size % mesh.size:
        raise ConfigError(f"global batch size {config.batch_size} is not divisible by the "
                          f"{mesh.size} devices")
    if config.batch_size % jax.process_count():
        raise ConfigError(f"global batch size {config.batch_size} is not divisible by the "
                          f"{jax.process_count()} processes")


def run_metadata(config, num_classes: int | None = None) -> dict:
    """What a train checkpoint belongs to; a resume with different values is refused.
    `num_classes` (the dataset's) is recorded when given."""
    uses_teacher = distill.method_requirements(config.method.name).uses_teacher
    meta = {"student": config.student.name,
            "student_overrides": model_overrides(config.student),
            "method": config.method.name,
            "teacher": config.teacher.get("name", "") if uses_teacher else "",
            "teacher_overrides": model_overrides(config.teacher) if uses_teacher else {},
            "dataset": config.dataset.name,
            # A population's members (None for a single run): its seeds and swept values.
            "population": population_metadata(config)}
    if num_classes is not None:
        meta["num_classes"] = num_classes
    return meta



def population_sweep(config) -> dict[str, tuple]:
    """`config.population.sweep` flattened: {dotted field path: its values}, in path order."""
    sweep = {}

    def walk(section, prefix):
        for key, value in section.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, prefix + key + ".")
            else:
                sweep[prefix + key] = value

    population = config.get("population")
    if population is not None:
        walk(population.get("sweep", {}), "")
    return sweep


def is_population(config) -> bool:
    population = config.get("population")
    return population is not None and bool(population.get("seeds") or population_sweep(config))


def population_metadata(config) -> dict | None:
    """A population's seeds and swept values as a checkpoint records them; None otherwise."""
    if not is_population(config):
        return None
    return {"seeds": [int(s) for s in config.population.seeds or (config.seed,)],
            "sweep": {path: list(values) for path, values in population_sweep(config).items()}}


def field_value(config, path: str):
    """The value at a dotted field path ("optimizer.lr")."""
    value = config
    for key in path.split("."):
        value = value[key]
    return value


# (field, check, what it must be): each value the trainer sizes, counts or divides by.
_VALUE_CHECKS = (
    ("batch_size", lambda v: v >= 1, "a positive number of images (the global batch)"),
    ("eval_batch_size", lambda v: v >= 0, ">= 0 (0: the train batch size)"),
    ("num_epochs", lambda v: v >= 0, ">= 0"),
    ("total_steps", lambda v: v >= 0, ">= 0 (0: use num_epochs)"),
    ("log_every_steps", lambda v: v >= 1, "a positive number of steps"),
    ("eval_every_steps", lambda v: v >= 1, "a positive number of steps"),
    ("checkpoint_every_steps", lambda v: v >= 1, "a positive number of steps"),
    ("eval_cka_examples", lambda v: v >= 0, ">= 0 (0: off)"),
    ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    ("dataset.image_size", lambda v: v >= 1, "a positive number of pixels"),
    ("dataset.train_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("dataset.num_neighbours", lambda v: v >= 1, "a positive count"),
    ("dataset.neighbour_pool", lambda v: v >= 1, "a positive count"),
    ("dataset.index_size", lambda v: v >= 1, "a positive count"),
    ("teacher.min_top1", lambda v: 0 <= v <= 100, "a percentage in [0, 100] (0: off)"),
    ("optimizer.lr", lambda v: v >= 0, ">= 0"),
    ("optimizer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optimizer.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optimizer.end_lr", lambda v: v >= 0, ">= 0"),
    ("optimizer.clip_norm", lambda v: v >= 0, ">= 0 (0: off)"),
    ("optimizer.decay_factor", lambda v: v > 0, "> 0"),
)
_NAMES = ("dataset.name", "student.name", "method.name")


def check_config_values(config) -> None:
    """Refuses values that would fail deep inside the run (a zero batch, an empty dataset
    fraction, a negative duration, an empty model name) with one message naming them all."""
    problems = []
    for path, ok, want in _VALUE_CHECKS:
        try:
            value = field_value(config, path)
        except (KeyError, AttributeError):
            continue  # a field this config does not have keeps its default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or not ok(value):
            problems.append(f"{path}={value!r} must be {want}")
    for path in _NAMES:
        if not str(field_value(config, path) or "").strip():
            problems.append(f"{path} must not be empty")
    if problems:
        raise ConfigError("invalid config value(s): " + "; ".join(problems))


def known_field_paths() -> list[str]:
    """Every field path a config may set: base_config's and each method's (`method.<field>`),
    to suggest a correction for a misspelt command-line override."""
    paths = set()

    def walk(section, prefix):
        for key, value in section.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, prefix + key + ".")
            else:
                paths.add(prefix + key)

    walk(recipes.base_config(), "")
    for name in distill.list_methods():
        paths.update(f"method.{field}" for field in distill.method_entry(name).config_fields())
    return sorted(paths)
