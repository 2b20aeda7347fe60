"""The method contract: a method is one registered Flax module whose fields are its config.

A method's submodules are its extra trainable parts (an AAD projector, OFA branches, ...),
trained with the student and dropped after training. The trainer only ever calls

    terms, new_state = method.apply(vars, student, teacher, batch, train=True, mutable=...)

with `student = Outputs(logits, features)` as the models return them, `teacher` a
`TeacherView` (None for methods that use no teacher) and `batch` holding 'image' ([0, 1]),
'label' (integer [B] or soft [B, C]) and 'index' (the example's position in the train split).
The method returns its loss terms, `{name: Term(weight, value)}`; `total_loss` weights and sums
them, and every term becomes a metric `train/<name>`. Non-trainable collections the method
creates (BN statistics, a memory bank) are carried in the train state and checkpointed; the
rng stream 'dropout' is available.

What a method needs is declared when it is registered (`Requirements`): whether it uses the
teacher's outputs or re-runs the teacher with its own hook, whether it reads labels, which
batch sampler feeds it, whether it keeps per-example state and whether it needs the labels of
the whole train split. The trainer derives its behaviour from these, and names no method.

Config: a method's dataclass fields are its config fields, with their defaults. Fields
declared with `derived()` are not config: they are computed from the models and the run by the
class's `derive(config, student, teacher, ctx)` (a teacher width, the dataset size, the run's
label smoothing).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import ml_collections
import numpy as np

from jaxkd import losses
from jaxkd.errors import ConfigError

# A method's non-trainable collection whose arrays are indexed by the (global) batch position,
# e.g. PAT's previous-batch feedback: sharded over the data axis like the batch itself.
PER_EXAMPLE_COLLECTION = "per_example"

TEACHER_USES = ("none", "outputs", "rerun")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a method may need to know about a model to size its modules."""

    name: str
    num_classes: int
    embed_dim: int
    stage_shapes: tuple[tuple[int, ...], ...]  # per stage, without the batch dimension
    # True when the stages are token grids (ViT, Swin, MLPs; Swin lays them out as NHWC maps),
    # False for a convolutional network's feature maps.
    token_stages: bool


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """Run facts a method may derive fields from.

    `train_labels` holds the integer label of every train example (indexed like
    batch['index']); it is filled only for methods registered with `train_labels=True`.
    """

    num_devices: int
    label_smoothing: float
    num_train_examples: int = 0
    train_labels: np.ndarray | None = None


class Outputs(NamedTuple):
    """A model's `(logits, features)`; features hold 'embedding' and 'stages'."""

    logits: Any
    features: Any


class TeacherView(NamedTuple):
    """The frozen teacher's outputs on the batch. For methods that declare teacher='rerun',
    `rerun(pre_stage)` runs the teacher again with the models' `pre_stage(i, x)` hook: the
    teacher's weights are under stop_gradient, what the hook adds is trained. For methods that
    declare teacher_head=True, `head(x)` applies the teacher's classifier (every model's
    logits are its Dense 'head' of features['embedding']) to any [B, D_t] input: its weights
    under stop_gradient, its input differentiable."""

    logits: Any
    features: Any
    rerun: Callable | None = None
    head: Callable | None = None


class Term(NamedTuple):
    weight: Any  # a float or a traced scalar (a warmed-up weight); None: a diagnostic only
    value: Any


def total_loss(terms: dict[str, Term]):
    """(sum of weight * value, {name: value}) over a method's terms, in their order; terms
    with weight None are logged but not summed."""
    total = None
    for term in terms.values():
        if term.weight is None:
            continue
        weighted = term.weight * term.value
        total = weighted if total is None else total + weighted
    return total, {name: term.value for name, term in terms.items()}


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What a method needs from the run (see the module docstring)."""

    teacher: str = "outputs"  # TEACHER_USES
    # reads the teacher's logits: False for methods that use only its features, which can
    # then distill from a headless backbone (a self-supervised MoCo ResNet-50)
    teacher_logits: bool = True
    labels: bool = True  # reads batch['label']: False for unsupervised methods
    sampler: str = "random"  # how train batches are drawn: one of jaxkd.data.SAMPLERS
    per_example: bool = False  # has a PER_EXAMPLE_COLLECTION
    train_labels: bool = False  # needs MethodContext.train_labels
    teacher_head: bool = False  # needs TeacherView.head

    def __post_init__(self):
        if self.teacher not in TEACHER_USES:
            raise ValueError(f"teacher use must be one of {TEACHER_USES}, got {self.teacher!r}")
        if self.teacher_head and self.teacher == "none":
            raise ValueError("teacher_head=True needs a teacher")

    @property
    def uses_teacher(self) -> bool:
        return self.teacher != "none"


def batch_groups(stats_groups: int, ctx: MethodContext) -> int:
    """Groups of the batch for per-group batch statistics: `stats_groups`, or one per device
    when it is 0 (the official codes' per-GPU statistics)."""
    if stats_groups < 0:
        raise ConfigError(f"stats_groups must be >= 0 (0: one group per device), got "
                          f"{stats_groups}")
    return ctx.num_devices if stats_groups == 0 else stats_groups


def derived(default=None):
    """A method field computed by `derive`, not set in the config."""
    return dataclasses.field(default=default, metadata={"derived": True})


class Method(nn.Module):
    """Base of every method: the run's label smoothing and the supervised CE term."""

    label_smoothing: float = derived(0.0)

    @classmethod
    def derive(cls, config: dict, student: ModelSpec, teacher: ModelSpec | None,
               ctx: MethodContext) -> dict:
        """Values of the derived fields; `config` holds the config fields. Overrides call
        super() and add theirs; validation of config values belongs here too."""
        del config, student, teacher
        return {"label_smoothing": ctx.label_smoothing}

    def supervised_loss(self, logits, labels):
        """CE against integer labels (with smoothing) or soft labels (mixup/cutmix)."""
        if labels.ndim == 2:
            return losses.soft_target_cross_entropy(logits, labels)
        return losses.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    cls: type
    requires: Requirements

    def config_fields(self) -> dict:
        """{field: default} of the config fields."""
        return {f.name: f.default for f in dataclasses.fields(self.cls)
                if f.name not in ("parent", "name") and not f.metadata.get("derived")}


_METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, **requires):
    """Class decorator: registers a `Method` subclass under `name` with its Requirements."""

    def wrap(cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"method {name!r}: {cls!r} is not a jaxkd.distill.Method subclass")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in ("parent", "name") and f.default is dataclasses.MISSING]
        if missing:
            raise TypeError(f"method {name!r}: every field needs a default (config fields) or "
                            f"derived() (computed fields); missing: {', '.join(missing)}")
        _METHODS[name] = MethodEntry(cls, Requirements(**requires))
        return cls

    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_entry(name: str) -> MethodEntry:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; available methods: "
                          f"{', '.join(list_methods())}") from None


def method_requirements(name: str) -> Requirements:
    return method_entry(name).requires


def method_config(name: str, **fields) -> ml_collections.ConfigDict:
    """The method's full ConfigDict: its defaults updated with `fields` (unknown ones refused)."""
    entry = method_entry(name)
    _check_fields(name, fields, entry)
    return ml_collections.ConfigDict({"name": name, **entry.config_fields(), **fields})


def _check_fields(name, fields, entry):
    known = entry.config_fields()
    unknown = sorted(set(fields) - set(known) - {"name"})
    if unknown:
        raise ConfigError(f"method {name!r} has no config field(s) {', '.join(unknown)}; its "
                          f"fields are: {', '.join(sorted(known)) or '(none)'}")


def create_method(config, student: ModelSpec, teacher: ModelSpec | None, ctx: MethodContext):
    """Builds the method named by `config.name`: its config fields, then derived ones."""
    entry = method_entry(config.name)
    fields = {k: v for k, v in config.items() if k != "name"}
    _check_fields(config.name, fields, entry)
    if entry.requires.uses_teacher and teacher is None:
        raise ConfigError(f"method {config.name!r} distills from a teacher: set config.teacher")
    values = {**entry.config_fields(), **fields}
    return entry.cls(**values, **entry.cls.derive(values, student, teacher, ctx))
