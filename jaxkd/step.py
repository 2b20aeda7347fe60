"""The pure train step: a frozen `Setup` (models, method, optimiser, shardings) and functions of
(setup, state, teacher variables, batch), jitted where they are used (`jit_train_step`).

One step runs the teacher's forward, the student's forward/backward and the method's loss
terms, with the batch sharded over a 1-D data mesh and the state replicated or sharded
(`config.sharding`, see jaxkd.sharding). What the method needs from the teacher comes from its
registered Requirements; this module names no method.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxkd import distill, optim, sharding
from jaxkd.build import ModelHandle, build_model, compute_dtype, load_teacher, model_spec


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {'student': ..., 'method': ...}
    # Non-trainable collections ({'batch_stats': ...}, a method's memory bank, ...) of each.
    model_state: Any  # {'student': {collection: ...}, 'method': {collection: ...}}
    opt_state: Any
    ema_params: Any  # EMA of params['student'], or None
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a step needs besides its arguments; built once per run by `build`."""

    mesh: Any
    student: ModelHandle
    teacher: ModelHandle | None
    method: nn.Module
    requires: distill.Requirements
    tx: optax.GradientTransformation
    schedule: Callable
    ema_decay: float
    batch_shape: tuple[int, ...]  # the global train batch of images
    teacher_shapes: Any  # ShapeDtypeStructs of the teacher's variables
    teacher_shardings: Any
    state_shardings: Any = None  # set by `build` from the state's shapes


def build(config, num_classes: int, steps_per_epoch: int, total_steps: int, mesh, *,
          num_train_examples: int = 0, train_labels: np.ndarray | None = None,
          loaded_teacher: tuple[Setup, Any] | None = None):
    """(Setup, teacher variables placed on the mesh, or None) for a run config.

    `loaded_teacher`: (a Setup of the same teacher, its variables on the mesh), so that
    several setups of one teacher (a population's members) load and place it once."""
    dtype = compute_dtype(config)
    image_size = config.dataset.image_size
    student = build_model(config.student, num_classes, dtype)
    requires = distill.method_requirements(config.method.name)
    teacher, teacher_variables, teacher_shardings = None, None, None
    if requires.uses_teacher and loaded_teacher is not None:
        other, teacher_variables = loaded_teacher
        teacher, teacher_shardings = other.teacher, other.teacher_shardings
    elif requires.uses_teacher:
        teacher, teacher_vars = load_teacher(config, num_classes, image_size, dtype,
                                             needs_logits=requires.teacher_logits
                                             or requires.teacher_head)
        teacher_shardings = sharding.tree_shardings(
            teacher_vars, mesh, sharding.check_strategy(
                config.get("teacher_sharding", "data"), "teacher_sharding"))
        teacher_variables = sharding.put(teacher_vars, teacher_shardings)
    ctx = distill.MethodContext(
        # The devices one student's batch is split over (a population's member axis aside).
        num_devices=mesh.shape[sharding.DATA_AXIS],
        label_smoothing=config.get("label_smoothing", 0.0),
        num_train_examples=num_train_examples,
        train_labels=train_labels if requires.train_labels else None)
    method = distill.create_method(config.method, model_spec(student, image_size),
                                   model_spec(teacher, image_size) if teacher else None, ctx)
    tx, schedule = optim.build_optimizer(config.optimizer, total_steps, steps_per_epoch)
    setup = Setup(mesh=mesh, student=student, teacher=teacher, method=method,
                  requires=requires, tx=tx, schedule=schedule,
                  ema_decay=config.get("ema_decay", 0.0),
                  batch_shape=(config.batch_size, image_size, image_size, 3),
                  teacher_shapes=jax.tree.map(
                      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), teacher_variables),
                  teacher_shardings=teacher_shardings)
    setup = dataclasses.replace(setup, state_shardings=_state_shardings(
        setup, config.get("sharding", "data")))
    return setup, teacher_variables


# --- state -------------------------------------------------------------------------------------
def _split_params(variables):
    """(params, every other collection) of a Flax variables dict."""
    variables = dict(variables)
    return variables.pop("params", {}), variables


def initial_state(setup: Setup, rng, images) -> TrainState:
    """Initial state; `images` has the training batch's shape, which some methods need
    (RSD's per-device statistics split the batch into groups). Of the teacher only the shapes
    of its variables matter here: zeros stand in for its weights."""
    rng_student, rng_method, rng_state = jax.random.split(rng, 3)
    student_vars = setup.student.module.init(rng_student, images, train=False)
    student = distill.Outputs(*setup.student.module.apply(student_vars, images, train=False))
    batch = {"image": images, "label": jnp.zeros(images.shape[:1], jnp.int32),
             "index": jnp.zeros(images.shape[:1], jnp.int32)}
    teacher = None
    if setup.teacher is not None:
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), setup.teacher_shapes)
        outputs = jax.eval_shape(lambda v: teacher_forward(setup, v, images), zeros)
        outputs = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), outputs)
        rerun = (functools.partial(teacher_forward, setup, zeros, images)
                 if setup.requires.teacher == "rerun" else None)
        head = (functools.partial(teacher_head, setup, zeros)
                if setup.requires.teacher_head else None)
        teacher = distill.TeacherView(*outputs, rerun=rerun, head=head)
    method_vars = setup.method.init(rng_method, student, teacher, batch, train=False)
    s_params, s_state = _split_params(student_vars)
    m_params, m_state = _split_params(method_vars)
    params = {"student": s_params, "method": m_params}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state={"student": s_state, "method": m_state},
                      opt_state=setup.tx.init(params),
                      ema_params=s_params if setup.ema_decay else None, rng=rng_state)


def _init_images(setup: Setup):
    return jax.ShapeDtypeStruct(setup.batch_shape, jnp.float32,
                                sharding=sharding.batch_sharding(setup.mesh))


def _state_shapes(setup: Setup):
    return jax.eval_shape(functools.partial(initial_state, setup), jax.random.PRNGKey(0),
                          _init_images(setup))


def _state_shardings(setup: Setup, strategy: str):
    """The state's shardings under `strategy` (jaxkd.sharding); the step counter and the rng
    key stay replicated, a method's per-example state is split like the batch."""
    repl = sharding.replicated(setup.mesh)
    shardings = sharding.tree_shardings(_state_shapes(setup), setup.mesh, strategy)
    shardings = shardings.replace(step=repl, rng=repl)
    method_state = dict(shardings.model_state["method"])
    if distill.PER_EXAMPLE_COLLECTION in method_state:
        method_state[distill.PER_EXAMPLE_COLLECTION] = jax.tree.map(
            lambda _: sharding.batch_sharding(setup.mesh),
            method_state[distill.PER_EXAMPLE_COLLECTION])
        shardings = shardings.replace(model_state={**shardings.model_state,
                                                   "method": method_state})
    return shardings


def abstract_state(setup: Setup):
    """The state's shapes and shardings, to restore a checkpoint onto."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        _state_shapes(setup), setup.state_shardings)


def zero_images(setup: Setup):
    """Inside a jitted initialisation: zeros shaped and split like the train batch's images."""
    spec = _init_images(setup)
    return jax.lax.with_sharding_constraint(jnp.zeros(spec.shape, spec.dtype), spec.sharding)


def init_state(setup: Setup, seed: int) -> TrainState:
    def init(rng):
        return initial_state(setup, rng, zero_images(setup))

    return jax.jit(init, out_shardings=setup.state_shardings)(jax.random.PRNGKey(seed))


def count_params(state: TrainState) -> dict:
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa
    return {"student": count(state.params["student"]), "method": count(state.params["method"])}


# --- forward passes ----------------------------------------------------------------------------
def teacher_forward(setup: Setup, teacher_variables, images, pre_stage=None):
    """The frozen teacher's (logits, features) on images in [0, 1], under stop_gradient."""
    variables = jax.lax.stop_gradient(sharding.gathered(teacher_variables, setup.mesh))
    return setup.teacher.module.apply(variables, setup.teacher.normalize(images), train=False,
                                      **({} if pre_stage is None else {"pre_stage": pre_stage}))


def teacher_head(setup: Setup, teacher_variables, embedding):
    """The frozen teacher's classifier on [B, D_t] inputs: every model's logits are its Dense
    'head' of features['embedding']."""
    head = jax.lax.stop_gradient(sharding.gathered(teacher_variables["params"]["head"],
                                                   setup.mesh))
    return (jnp.matmul(embedding, head["kernel"].astype(embedding.dtype))
            + head["bias"].astype(embedding.dtype))


def teacher_view(setup: Setup, teacher_variables, images) -> distill.TeacherView | None:
    """What the method sees of the teacher: its outputs, plus `rerun(pre_stage)` for methods
    that declared teacher='rerun' and `head(x)` for those that declared teacher_head."""
    if setup.teacher is None:
        return None
    rerun, head = None, None
    if setup.requires.teacher == "rerun":
        rerun = functools.partial(teacher_forward, setup, teacher_variables, images)
    if setup.requires.teacher_head:
        head = functools.partial(teacher_head, setup, teacher_variables)
    return distill.TeacherView(*teacher_forward(setup, teacher_variables, images), rerun=rerun,
                               head=head)


def student_forward(setup: Setup, params, student_state, images):
    """(logits, features) of the student in evaluation mode."""
    params, student_state = sharding.gathered((params, student_state), setup.mesh)
    return setup.student.module.apply({"params": params, **student_state},
                                      setup.student.normalize(images), train=False)


def _gathered_method_state(setup: Setup, method_state):
    """Whole on every device, but for the per-example collection: split like the batch."""
    per_example = {k: v for k, v in method_state.items()
                   if k == distill.PER_EXAMPLE_COLLECTION}
    rest = {k: v for k, v in method_state.items() if k != distill.PER_EXAMPLE_COLLECTION}
    return {**sharding.gathered(rest, setup.mesh), **per_example}


def loss(setup: Setup, params, model_state, teacher, batch, rng):
    """The training loss of `params` on `batch` given the teacher's view of it: the student's
    forward and the method's weighted terms. Returns (loss, (term values, new model state,
    student logits)); differentiate it with respect to `params`."""
    rng_student, rng_method = jax.random.split(rng)
    student_state = sharding.gathered(model_state["student"], setup.mesh)
    method_state = _gathered_method_state(setup, model_state["method"])
    params = sharding.gathered(params, setup.mesh)
    student_out, student_state_new = setup.student.module.apply(
        {"params": params["student"], **student_state},
        setup.student.normalize(batch["image"]), train=True, mutable=list(student_state),
        rngs={"dropout": rng_student})
    terms, method_state_new = setup.method.apply(
        {"params": params["method"], **method_state}, distill.Outputs(*student_out), teacher,
        batch, train=True, mutable=list(method_state), rngs={"dropout": rng_method})
    total, values = distill.total_loss(terms)
    model_state = {"student": dict(student_state_new), "method": dict(method_state_new)}
    return total.astype(jnp.float32), (values, model_state, student_out[0])


def top_k_correct(logits, labels, k):
    topk = jax.lax.top_k(logits, k)[1]
    return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def classification_counts(logits, batch) -> dict:
    """Correct top-1 / top-5 predictions and examples in a padded batch (its 'mask')."""
    logits = logits.astype(jnp.float32)
    mask = batch["mask"]
    k5 = min(5, logits.shape[-1])
    return {"top1": jnp.sum(top_k_correct(logits, batch["label"], 1) * mask),
            "top5": jnp.sum(top_k_correct(logits, batch["label"], k5) * mask),
            "count": jnp.sum(mask)}


def eval_step(setup: Setup, params, student_state, batch) -> dict:
    """classification_counts of the student (in evaluation mode) on `batch`."""
    logits, _ = student_forward(setup, params, student_state, batch["image"])
    return classification_counts(logits, batch)


def train_step(setup: Setup, state: TrainState, teacher_variables, batch):
    """One update of the student and the method's parts; returns (new state, metrics)."""
    return update(setup, state, teacher_view(setup, teacher_variables, batch["image"]), batch)


def update(setup: Setup, state: TrainState, teacher: distill.TeacherView | None, batch):
    """`train_step` given the teacher's view of the batch (which a population's members
    share)."""
    rng = jax.random.fold_in(state.rng, state.step)
    (total, (values, model_state, logits)), grads = jax.value_and_grad(
        lambda params: loss(setup, params, state.model_state, teacher, batch, rng),
        has_aux=True)(state.params)
    # Sharded like the parameters (a reduce-scatter under FSDP): the update is then local.
    grads = jax.lax.with_sharding_constraint(grads, setup.state_shardings.params)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        ema = optax.incremental_update(params["student"], ema, 1.0 - setup.ema_decay)
    metrics = {**{f"train/{k}": v for k, v in values.items()},
               "train/loss": total,
               "train/grad_norm": optax.tree.norm(grads),
               "train/lr": setup.schedule(state.step)}
    if setup.requires.labels:  # unsupervised methods read no labels
        labels = batch["label"]
        hard_labels = labels if labels.ndim == 1 else jnp.argmax(labels, -1)
        metrics["train/top1"] = jnp.mean(top_k_correct(logits.astype(jnp.float32),
                                                       hard_labels, 1))
    # A non-finite loss or gradient never reaches the state: the step leaves it as it was
    # (but for the step) and is flagged for the host, which at its next sync stops the run
    # or, with skip_nonfinite_updates, only counts it. One program for both settings.
    finite = jnp.isfinite(total) & jnp.isfinite(metrics["train/grad_norm"])
    metrics["train/nonfinite"] = 1.0 - finite.astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state, ema_params=ema)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=state.step + 1))
    return new_state, metrics


def jit_train_step(setup: Setup):
    """`train_step` jitted for the mesh: `(state, teacher_variables, batch) -> (state,
    metrics)`, the state donated."""
    repl = sharding.replicated(setup.mesh)
    return jax.jit(functools.partial(train_step, setup),
                   in_shardings=(setup.state_shardings, setup.teacher_shardings or repl,
                                 sharding.batch_sharding(setup.mesh)),
                   out_shardings=(setup.state_shardings, repl), donate_argnums=(0,))
