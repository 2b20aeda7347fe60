"""Feature-based methods, supervised and adapted to unsupervised distillation.

A `FeatureMethod` returns the supervised CE plus its `distill_terms`. Registered with
`register_feature_method(name)`, it also gets an unsupervised variant `<name>_unsup`: the
protocol of the CoSS supplement's section 1 and Table 1 (supervised methods adapted as CRD's
code base runs them with the label and soft-label weights at 0). The variant:
  - is registered with labels=False, so the trainer reads no label, logs no train top-1 and
    evaluates the student's embedding by k-NN (and `scripts/probe.py` fits the linear probe);
  - drops the CE term, and `distill_terms` sees `self.unsupervised` True to leave out any
    term on logits (the teacher's and the student's heads play no part);
  - passes the batch without its 'label' entry, so a method that read labels would fail at
    trace time rather than use them;
  - multiplies every weighted term by the config field `loss_scale` (1.0), the scale the paper
    sweeps over {0.5, 1, 2, 4, 8, 16, 32} for each baseline; terms named in the class's
    `unscaled_terms` are left alone (FT's paraphraser pre-training, outside the swept loss).
Fields of the method stay the variant's fields, with their defaults unless
`unsupervised_defaults` names others.

Stage features: methods on stage maps pair student stage k with teacher stage k for as many
stages as the shallower model has (RepDistiller zips `feat[1:-1]`: 3 stages for CIFAR ResNets
and WRNs, 4 for VGGs and ImageNet models); token stages are viewed as their square patch grid
(prefix tokens dropped, as FitNet does), so any pair of square stages works.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn

from jaxkd.distill.base import Method, ModelSpec, Term, register_method
from jaxkd.distill.fitnet import as_grid
from jaxkd.distill.ofa import token_layout
from jaxkd.errors import ConfigError

UNSUPERVISED_SUFFIX = "_unsup"


class FeatureMethod(Method):
    """CE (weight 1, RepDistiller's gamma) plus `distill_terms`."""

    unsupervised: ClassVar[bool] = False
    unscaled_terms: ClassVar[tuple[str, ...]] = ()

    def distill_terms(self, student, teacher, batch, *, train: bool) -> dict[str, Term]:
        """The method's terms; `batch` holds 'image' and 'index' (and 'label' only when
        supervised). Leave out terms on logits when `self.unsupervised`."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, student, teacher, batch, *, train: bool):
        return {"ce": Term(1.0, self.supervised_loss(student.logits, batch["label"])),
                **self.distill_terms(student, teacher, batch, train=train)}


def _unsupervised_call(self, student, teacher, batch, *, train: bool):
    unlabelled = {key: value for key, value in batch.items() if key != "label"}
    terms = self.distill_terms(student, teacher, unlabelled, train=train)
    return {name: term if term.weight is None or name in self.unscaled_terms
            else Term(self.loss_scale * term.weight, term.value)
            for name, term in terms.items()}


def _unsupervised_variant(cls, defaults: dict):
    annotations, namespace = {"loss_scale": float}, {"loss_scale": 1.0}
    for field, value in defaults.items():
        annotations[field] = cls.__dataclass_fields__[field].type
        namespace[field] = value
    name = f"{cls.__name__}Unsupervised"
    return type(name, (cls,), {**namespace, "__annotations__": annotations,
                               "__module__": cls.__module__, "__qualname__": name,
                               "__doc__": f"{cls.__name__} without labels (see "
                                          f"jaxkd.distill.feature).",
                               "unsupervised": True,
                               "__call__": nn.compact(_unsupervised_call)})


def register_feature_method(name: str, unsupervised_defaults: dict | None = None, **requires):
    """Registers a FeatureMethod under `name` and its unsupervised variant under
    `name + '_unsup'` (labels=False; no train labels and no teacher head needed)."""

    def wrap(cls):
        if not issubclass(cls, FeatureMethod):
            raise TypeError(f"method {name!r}: {cls!r} is not a FeatureMethod")
        register_method(name, **requires)(cls)
        unsupervised = {**requires, "labels": False, "train_labels": False,
                        "teacher_head": False}
        register_method(name + UNSUPERVISED_SUFFIX, **unsupervised)(
            _unsupervised_variant(cls, unsupervised_defaults or {}))
        return cls

    return wrap


def paired_stage_count(student: ModelSpec, teacher: ModelSpec) -> int:
    """Stages paired in order: as many as the shallower model has. ConfigError when a model
    has none or a stage is not a square map or token grid."""
    for spec in (student, teacher):
        if not spec.stage_shapes:
            raise ConfigError(f"model {spec.name!r} has no stage features")
        for shape in spec.stage_shapes:
            token_layout(shape)
    return min(len(student.stage_shapes), len(teacher.stage_shapes))


def stage_grid(feature):
    """A stage feature as an NHWC grid: maps as they are, tokens [B, P + g*g, C] as their
    g x g patch grid without the P prefix tokens."""
    return as_grid(feature, token_layout(feature.shape[1:])[0])
