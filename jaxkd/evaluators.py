"""Evaluators: what a run measures at each evaluation, as plug-ins named in `config.evals`.

An evaluator is registered under a name with `register_evaluator`; it is built once per run
from an `EvalContext` and called with the train state, returning `{metric: value}`. With
`config.evals` empty the method's defaults run: "classification" for methods that read
labels, "knn" for those that do not (an unsupervised student's head is never trained), plus
"cka" when `config.eval_cka_examples` > 0. The teacher is measured once, at step 0
(`evaluate_teacher`). Adding an evaluator touches no loop code.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import sharding, step
from jaxkd.analysis import training_eval
from jaxkd.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What evaluators may use: the run's setup and teacher, and its data as iterators of
    numpy batches in [0, 1] (padded eval batches carry a 'mask')."""

    config: Any
    setup: step.Setup
    teacher_variables: Any
    num_classes: int
    eval_batches: Callable[[], Iterator[dict]]
    # the centre-cropped train split, in order (k-NN's reference set)
    train_batches: Callable[[], Iterator[dict]]


_EVALUATORS: dict[str, Callable[[EvalContext], Callable]] = {}


def register_evaluator(name: str):
    def wrap(factory):
        if name in _EVALUATORS:
            raise ValueError(f"evaluator {name!r} registered twice")
        _EVALUATORS[name] = factory
        return factory

    return wrap


def list_evaluators() -> list[str]:
    return sorted(_EVALUATORS)


def default_evals(config, requires) -> tuple[str, ...]:
    names = ["classification" if requires.labels else "knn"]
    if config.get("eval_cka_examples", 0) > 0:
        names.append("cka")
    return tuple(names)


def build_evaluators(ctx: EvalContext) -> list[Callable]:
    names = tuple(ctx.config.get("evals", ())) or default_evals(ctx.config, ctx.setup.requires)
    unknown = [n for n in names if n not in _EVALUATORS]
    if unknown:
        raise ConfigError(f"unknown evaluator(s) {unknown} in config.evals; available: "
                          f"{', '.join(list_evaluators())}")
    return [_EVALUATORS[name](ctx) for name in names]


def evaluate(evaluators, state) -> dict:
    out = {}
    for evaluator in evaluators:
        out.update(evaluator(state))
    return out


def _accuracy(batches, counts_fn, mesh) -> dict:
    """top-1 / top-5 (%) over padded, masked batches; `counts_fn(batch on the mesh)`."""
    totals = None
    for batch in batches:
        counts = jax.device_get(counts_fn(sharding.global_batch(batch, mesh)))
        totals = counts if totals is None else jax.tree.map(np.add, totals, counts)
    n = max(float(totals["count"]), 1.0)
    return {"top1": 100.0 * float(totals["top1"]) / n, "top5": 100.0 * float(totals["top5"]) / n}


@register_evaluator("classification")
def classification(ctx: EvalContext):
    """eval/top1 and eval/top5 of the student (and eval/ema_top1 of its EMA)."""
    setup = ctx.setup

    counts = jax.jit(functools.partial(step.eval_step, setup))

    def run(state):
        def accuracy(params):
            return _accuracy(ctx.eval_batches(), lambda b: counts(
                params, state.model_state["student"], b), setup.mesh)

        result = accuracy(state.params["student"])
        out = {"eval/top1": result["top1"], "eval/top5": result["top5"]}
        if state.ema_params is not None:
            out["eval/ema_top1"] = accuracy(state.ema_params)["top1"]
        return out

    return run


def _single_process(name: str, run):
    """k-NN and CKA gather whole splits on the host: single-process runs only."""
    if jax.process_count() > 1:
        log.warning("the %s evaluation runs in single-process runs only; skipped", name)
        return lambda state: {}
    return run


def _on_mesh(images, mesh):
    return sharding.global_batch({"image": images}, mesh)


@register_evaluator("knn")
def knn(ctx: EvalContext):
    """eval/knn_top1: a cosine k-NN vote over the train split's student embeddings."""
    setup = ctx.setup
    embed = jax.jit(lambda params, student_state, images: step.student_forward(
        setup, params, student_state, images)[1]["embedding"])

    def run(state):
        params, student_state = state.params["student"], state.model_state["student"]
        return training_eval.knn_metrics(
            lambda x: embed(params, student_state, _on_mesh(x, setup.mesh)["image"]),
            ctx.train_batches(), ctx.eval_batches(), ctx.num_classes)

    return _single_process("k-NN", run)


@register_evaluator("cka")
def cka(ctx: EvalContext):
    """eval/cka_*: teacher-student linear CKA per stage and of the embeddings."""
    setup = ctx.setup
    if setup.teacher is None:
        raise ConfigError("the cka evaluator (config.evals, or eval_cka_examples > 0) compares "
                          "the teacher's stages with the student's, but method "
                          f"{ctx.config.method.name!r} has no teacher")
    num_examples = ctx.config.get("eval_cka_examples", 0)
    if num_examples <= 0:
        raise ConfigError("the cka evaluator needs config.eval_cka_examples > 0")

    def flat(features):
        return [x.reshape(x.shape[0], -1).astype(jnp.float32)
                for x in (*features["stages"], features["embedding"])]

    @jax.jit
    def layers(params, student_state, teacher_variables, images):
        student = step.student_forward(setup, params, student_state, images)[1]
        return flat(student), flat(step.teacher_forward(setup, teacher_variables, images)[1])

    def run(state):
        params, student_state = state.params["student"], state.model_state["student"]
        return training_eval.cka_metrics(
            lambda x: layers(params, student_state, ctx.teacher_variables,
                             _on_mesh(x, setup.mesh)["image"]),
            ctx.eval_batches(), num_examples)

    return _single_process("CKA", run)


def evaluate_teacher(ctx: EvalContext) -> dict:
    """eval/teacher_top1 and eval/teacher_top5 at step 0. A teacher near chance level (below
    twice it) is reported loudly; below `config.teacher.min_top1` (> 0) it stops the run."""
    setup = ctx.setup

    @jax.jit
    def counts(teacher_variables, batch):
        logits, _ = step.teacher_forward(setup, teacher_variables, batch["image"])
        return step.classification_counts(logits, batch)

    result = _accuracy(ctx.eval_batches(), lambda b: counts(ctx.teacher_variables, b),
                       setup.mesh)
    check_teacher_accuracy(ctx.config, result["top1"], ctx.num_classes)
    return {"eval/teacher_top1": result["top1"], "eval/teacher_top5": result["top5"]}


def check_teacher_accuracy(config, top1: float, num_classes: int) -> None:
    chance = 100.0 / num_classes
    tcfg = config.teacher
    causes = ("a checkpoint of another model or dataset, a classifier head trained on other "
              "classes, inputs normalised differently from the teacher's training, or a "
              "checkpoint layout that was not converted (scripts/convert_timm.py)")
    minimum = tcfg.get("min_top1", 0.0)
    if minimum > 0 and top1 < minimum:
        raise ConfigError(f"teacher {tcfg.name!r} ({tcfg.checkpoint}) has held-out top-1 "
                          f"{top1:.2f}%, below config.teacher.min_top1 = {minimum:g}% (chance "
                          f"is {chance:.2f}%). Likely causes: {causes}")
    if top1 < 2 * chance:
        log.warning("\n%s\nTEACHER NEAR CHANCE: %r (%s) has held-out top-1 %.2f%% with chance "
                    "at %.2f%%. Distilling from it will not help. Likely causes: %s. Set "
                    "config.teacher.min_top1 to stop such runs.\n%s", "!" * 78, tcfg.name,
                    tcfg.checkpoint, top1, chance, causes, "!" * 78)
