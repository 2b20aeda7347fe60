"""The training loop: supervised training of one model, or distillation from a frozen teacher.

One jitted step runs the teacher's forward, the student's forward/backward and the method's
loss, with the batch sharded over a 1-D data mesh and the state replicated or sharded
(`config.sharding`, see jaxkd.sharding). Which method is used is data (`config.method.name`):
this module names none.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from jaxkd import checkpoint, data, distill, models, optim, recipes, sharding
from jaxkd.analysis import training_eval
from jaxkd.errors import CheckpointError, ConfigError, NonFiniteLossError, Preempted
from jaxkd.metric_writer import MetricWriter

log = logging.getLogger(__name__)


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


def _compute_dtype(config):
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if config.compute_dtype not in names:
        raise ConfigError(f"compute_dtype must be one of {sorted(names)}, "
                          f"got {config.compute_dtype!r}")
    return names[config.compute_dtype]


def _overrides(model_config) -> dict:
    """Model overrides in their JSON form (tuples as lists), as checkpoints record them."""
    return json.loads(json.dumps(dict(model_config.get("overrides", {}) or {})))


def build_model(model_config, num_classes: int, dtype) -> ModelHandle:
    info = models.model_info(model_config.name)
    overrides = _overrides(model_config)
    module = models.create_model(model_config.name, num_classes=num_classes, dtype=dtype,
                                 **overrides)
    return ModelHandle(model_config.name, module, np.asarray(info.mean, np.float32),
                       np.asarray(info.std, np.float32), overrides, num_classes)


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
        name=handle.name, family=models.model_info(handle.name).family,
        num_classes=handle.num_classes, embed_dim=features["embedding"].shape[-1],
        stage_shapes=tuple(tuple(s.shape[1:]) for s in features["stages"]))


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


def load_teacher(config, num_classes: int, image_size: int, dtype):
    """Builds the teacher and loads its export; returns (handle, variables)."""
    tcfg = config.teacher
    if not tcfg.get("checkpoint"):
        raise ConfigError(f"teacher {tcfg.name!r} needs config.teacher.checkpoint: a model "
                          "export (a supervised run's <workdir>/export or the output of "
                          "scripts/convert_timm.py)")
    variables, meta = checkpoint.load_model(tcfg.checkpoint)
    overrides = _overrides(tcfg)
    if meta.get("model_name") != tcfg.name or meta.get("num_classes") != num_classes or \
            meta.get("overrides", {}) != overrides:
        raise CheckpointError(
            f"teacher checkpoint {tcfg.checkpoint!r} holds {meta.get('model_name')!r} with "
            f"{meta.get('num_classes')} classes and overrides {meta.get('overrides')}, but the "
            f"config asks for {tcfg.name!r} with {num_classes} classes and overrides {overrides}")
    handle = build_model(tcfg, num_classes, dtype)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    try:
        expected = jax.eval_shape(lambda x: handle.module.init(jax.random.PRNGKey(0), x), x)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"teacher {tcfg.name!r} cannot take {image_size}px images: {e}"
                          ) from None
    check_variables(expected, variables, f"teacher checkpoint {tcfg.checkpoint!r}")
    return handle, variables


def _split_params(variables):
    """(params, every other collection) of a Flax variables dict."""
    variables = dict(variables)
    return variables.pop("params", {}), variables


def _top_k_correct(logits, labels, k):
    topk = jax.lax.top_k(logits, k)[1]
    return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


class Trainer:
    """Builds the models, the method, the optimiser and the jitted steps for one config."""

    def __init__(self, config, num_classes: int, steps_per_epoch: int, total_steps: int,
                 mesh, num_train_examples: int = 0):
        self.config = config
        self.mesh = mesh
        dtype = _compute_dtype(config)
        image_size = config.dataset.image_size
        self.student = build_model(config.student, num_classes, dtype)
        entry = distill.method_entry(config.method.name)
        self.teacher, self.teacher_variables, self.teacher_shardings = None, None, None
        if entry.uses_teacher:
            if not config.teacher.get("name"):
                raise ConfigError(f"method {config.method.name!r} needs config.teacher.name")
            self.teacher, teacher_vars = load_teacher(config, num_classes, image_size, dtype)
            self.teacher_shardings = sharding.tree_shardings(
                teacher_vars, mesh, sharding.check_strategy(
                    config.get("teacher_sharding", "data"), "teacher_sharding"))
            self.teacher_variables = sharding.put(teacher_vars, self.teacher_shardings)
        student_spec = model_spec(self.student, image_size)
        teacher_spec = model_spec(self.teacher, image_size) if self.teacher else None
        ctx = distill.MethodContext(num_devices=mesh.size,
                                    label_smoothing=config.get("label_smoothing", 0.0),
                                    num_train_examples=num_train_examples)
        self.method = distill.create_method(config.method, student_spec, teacher_spec, ctx)
        self.method_runs_teacher = entry.runs_teacher
        self.teacher_spec = teacher_spec
        self.tx, self.schedule = optim.build_optimizer(config.optimizer, total_steps,
                                                       steps_per_epoch)
        self.ema_decay = config.get("ema_decay", 0.0)
        self.skip_nonfinite_updates = config.get("skip_nonfinite_updates", False)
        self._image_shape = (image_size, image_size, 3)
        self._num_classes = num_classes
        repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        self.state_shardings = self._state_shardings(config.get("sharding", "data"))
        state_sh, teacher_sh = self.state_shardings, self.teacher_shardings or repl
        self.train_step = jax.jit(self._train_step, in_shardings=(state_sh, teacher_sh, batch),
                                  out_shardings=(state_sh, repl), donate_argnums=(0,))
        student_sh = (state_sh.params["student"], state_sh.model_state["student"])
        self.eval_step = jax.jit(self._eval_step, in_shardings=(*student_sh, batch),
                                 out_shardings=repl)
        self.teacher_eval_step = jax.jit(self._teacher_eval_step,
                                         in_shardings=(teacher_sh, batch), out_shardings=repl)
        self.embed_step = jax.jit(self._embed_step, in_shardings=(*student_sh, batch),
                                  out_shardings=repl)
        self.layers_step = jax.jit(self._layers_step,
                                   in_shardings=(*student_sh, teacher_sh, batch),
                                   out_shardings=repl)

    # --- state -----------------------------------------------------------------------------
    def _init(self, rng, images):
        """Initial state; `images` has the training batch's shape, which some methods need
        (RSD's per-device statistics split the batch into groups)."""
        rng_student, rng_method, rng_state = jax.random.split(rng, 3)
        student_vars = self.student.module.init(rng_student, images, train=False)
        student_out = self.student.module.apply(student_vars, images, train=False)
        teacher_out = self._teacher_placeholder(images)
        batch = {"image": images, "label": jnp.zeros(images.shape[:1], jnp.int32),
                 "index": jnp.zeros(images.shape[:1], jnp.int32)}
        runner = {}
        if self.method_runs_teacher:  # zero teacher weights: only the shapes matter here
            runner = self._teacher_runner(jax.tree.map(jnp.zeros_like, self.teacher_variables),
                                          images)
        method_vars = self.method.init(rng_method, student_out, teacher_out, batch, train=False,
                                       **runner)
        s_params, s_state = _split_params(student_vars)
        m_params, m_state = _split_params(method_vars)
        params = {"student": s_params, "method": m_params}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          model_state={"student": s_state, "method": m_state},
                          opt_state=self.tx.init(params),
                          ema_params=s_params if self.ema_decay else None, rng=rng_state)

    def _teacher_placeholder(self, images):
        if self.teacher is None:
            return None
        shapes = jax.eval_shape(lambda v, x: self.teacher.module.apply(v, x, train=False),
                                self.teacher_variables, images)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

    def _init_images(self):
        return jax.ShapeDtypeStruct((self.config.batch_size, *self._image_shape), jnp.float32,
                                    sharding=sharding.batch_sharding(self.mesh))

    def _state_shapes(self):
        return jax.eval_shape(self._init, jax.random.PRNGKey(0), self._init_images())

    def _state_shardings(self, strategy: str):
        """The state's shardings under `strategy` (jaxkd.sharding); the step counter and the
        rng key stay replicated."""
        repl = sharding.replicated(self.mesh)
        shardings = sharding.tree_shardings(self._state_shapes(), self.mesh, strategy)
        shardings = shardings.replace(step=repl, rng=repl)
        method_state = dict(shardings.model_state["method"])
        if distill.PER_EXAMPLE_COLLECTION in method_state:
            method_state[distill.PER_EXAMPLE_COLLECTION] = jax.tree.map(
                lambda _: sharding.batch_sharding(self.mesh),
                method_state[distill.PER_EXAMPLE_COLLECTION])
            shardings = shardings.replace(
                model_state={**shardings.model_state, "method": method_state})
        return shardings

    def abstract_state(self):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self._state_shapes(), self.state_shardings)

    def init_state(self, seed: int) -> TrainState:
        spec = self._init_images()
        images = lambda: jax.lax.with_sharding_constraint(jnp.zeros(spec.shape, spec.dtype),
                                                          spec.sharding)
        init = jax.jit(lambda rng: self._init(rng, images()), out_shardings=self.state_shardings)
        return init(jax.random.PRNGKey(seed))

    def count_params(self, state) -> dict:
        count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
        return {"student": count(state.params["student"]),
                "method": count(state.params["method"])}

    # --- steps -----------------------------------------------------------------------------
    def _teacher_forward(self, teacher_variables, images):
        if self.teacher is None:
            return None
        out = self.teacher.module.apply(sharding.gathered(teacher_variables, self.mesh),
                                        self.teacher.normalize(images), train=False)
        return jax.lax.stop_gradient(out)

    def _teacher_runner(self, teacher_variables, images) -> dict:
        """`teacher_forward(pre_stage)` for methods registered with runs_teacher, else {}."""
        if not self.method_runs_teacher:
            return {}
        variables = jax.lax.stop_gradient(sharding.gathered(teacher_variables, self.mesh))
        x = self.teacher.normalize(images)
        return {"teacher_forward": lambda pre_stage: self.teacher.module.apply(
            variables, x, train=False, pre_stage=pre_stage)}

    def _gathered_method_state(self, method_state):
        """Whole on every device, but for the per-example collection: split like the batch."""
        per_example = {k: v for k, v in method_state.items()
                       if k == distill.PER_EXAMPLE_COLLECTION}
        rest = {k: v for k, v in method_state.items() if k != distill.PER_EXAMPLE_COLLECTION}
        return {**sharding.gathered(rest, self.mesh), **per_example}

    def loss(self, params, model_state, teacher_out, teacher_runner, batch, rng):
        """The training loss of `params` on `batch` given the teacher's output (and, for
        methods that run the teacher themselves, `_teacher_runner`'s): the student's forward
        and the method's loss. Returns (loss, (method metrics, new model state, student
        logits)); differentiate it with respect to `params`."""
        rng_student, rng_method = jax.random.split(rng)
        student_state = sharding.gathered(model_state["student"], self.mesh)
        method_state = self._gathered_method_state(model_state["method"])
        params = sharding.gathered(params, self.mesh)
        student_out, student_state_new = self.student.module.apply(
            {"params": params["student"], **student_state},
            self.student.normalize(batch["image"]), train=True, mutable=list(student_state),
            rngs={"dropout": rng_student})
        (loss, metrics), method_state_new = self.method.apply(
            {"params": params["method"], **method_state}, student_out, teacher_out, batch,
            train=True, mutable=list(method_state), rngs={"dropout": rng_method},
            **teacher_runner)
        model_state = {"student": dict(student_state_new), "method": dict(method_state_new)}
        return loss.astype(jnp.float32), (metrics, model_state, student_out[0])

    def _train_step(self, state: TrainState, teacher_variables, batch):
        images, labels = batch["image"], batch["label"]
        teacher_out = self._teacher_forward(teacher_variables, images)
        teacher_runner = self._teacher_runner(teacher_variables, images)
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (metrics, model_state, logits)), grads = jax.value_and_grad(
            lambda params: self.loss(params, state.model_state, teacher_out, teacher_runner,
                                     batch, rng), has_aux=True)(state.params)
        # Sharded like the parameters (a reduce-scatter under FSDP): the update is then local.
        grads = jax.lax.with_sharding_constraint(grads, self.state_shardings.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = optax.incremental_update(params["student"], ema, 1.0 - self.ema_decay)
        metrics = {**{f"train/{k}": v for k, v in metrics.items()},
                   "train/loss": loss,
                   "train/grad_norm": optax.tree.norm(grads),
                   "train/lr": self.schedule(state.step)}
        if self.config.get("supervised", True):  # unsupervised runs read no labels
            hard_labels = labels if labels.ndim == 1 else jnp.argmax(labels, -1)
            metrics["train/top1"] = jnp.mean(_top_k_correct(logits.astype(jnp.float32),
                                                            hard_labels, 1))
        # A non-finite loss or gradient never reaches the state: the step leaves it as it was
        # (but for the step) and is flagged for the host, which at its next sync stops the run
        # or, with skip_nonfinite_updates, only counts it. One program for both settings.
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["train/grad_norm"])
        metrics["train/nonfinite"] = 1.0 - finite.astype(jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                                  opt_state=opt_state, ema_params=ema)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                 state.replace(step=state.step + 1))
        return new_state, metrics

    def _eval_counts(self, logits, batch):
        logits = logits.astype(jnp.float32)
        mask = batch["mask"]
        k5 = min(5, logits.shape[-1])
        return {"top1": jnp.sum(_top_k_correct(logits, batch["label"], 1) * mask),
                "top5": jnp.sum(_top_k_correct(logits, batch["label"], k5) * mask),
                "count": jnp.sum(mask)}

    def _student_forward(self, params, student_state, images):
        """(logits, features) of the student in evaluation mode."""
        params, student_state = sharding.gathered((params, student_state), self.mesh)
        return self.student.module.apply({"params": params, **student_state},
                                         self.student.normalize(images), train=False)

    def _eval_step(self, params, student_state, batch):
        logits, _ = self._student_forward(params, student_state, batch["image"])
        return self._eval_counts(logits, batch)

    def _teacher_eval_step(self, teacher_variables, batch):
        logits, _ = self._teacher_forward(teacher_variables, batch["image"])
        return self._eval_counts(logits, batch)

    def _embed_step(self, params, student_state, batch):
        return self._student_forward(params, student_state, batch["image"])[1]["embedding"]

    def _layers_step(self, params, student_state, teacher_variables, batch):
        """(student, teacher) stage features and embeddings, flattened per example."""
        def flat(features):
            return [x.reshape(x.shape[0], -1).astype(jnp.float32)
                    for x in (*features["stages"], features["embedding"])]

        student = self._student_forward(params, student_state, batch["image"])[1]
        return flat(student), flat(self._teacher_forward(teacher_variables, batch["image"])[1])


def _sum_counts(batches, step_fn, mesh):
    totals = None
    for batch in batches:
        counts = jax.device_get(step_fn(sharding.global_batch(batch, mesh)))
        totals = counts if totals is None else jax.tree.map(np.add, totals, counts)
    n = max(float(totals["count"]), 1.0)
    return {"top1": 100.0 * float(totals["top1"]) / n, "top5": 100.0 * float(totals["top5"]) / n}


def resolve_durations(config, num_train_examples: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps); `total_steps` > 0 overrides `num_epochs`."""
    steps_per_epoch = max(num_train_examples // config.batch_size, 1)
    total = config.get("total_steps", 0) or int(math.ceil(config.num_epochs * steps_per_epoch))
    if total <= 0:
        raise ConfigError("set config.num_epochs or config.total_steps to a positive value")
    return steps_per_epoch, total


# Sections that check their own fields (a method's, the augmentations) or hold a model's
# keyword arguments.
_SELF_CHECKED_FIELDS = ("method", "augment", "student.overrides", "teacher.overrides")


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


def _check_batch_size(config, mesh):
    if config.batch_size % mesh.size:
        raise ConfigError(f"global batch size {config.batch_size} is not divisible by the "
                          f"{mesh.size} devices")
    if config.batch_size % jax.process_count():
        raise ConfigError(f"global batch size {config.batch_size} is not divisible by the "
                          f"{jax.process_count()} processes")


def run_metadata(config, num_classes: int | None = None) -> dict:
    """What a train checkpoint belongs to; a resume with different values is refused.
    `num_classes` (the dataset's) is recorded when given."""
    uses_teacher = distill.method_entry(config.method.name).uses_teacher
    meta = {"student": config.student.name,
            "student_overrides": _overrides(config.student),
            "method": config.method.name,
            "teacher": config.teacher.get("name", "") if uses_teacher else "",
            "teacher_overrides": _overrides(config.teacher) if uses_teacher else {},
            "dataset": config.dataset.name}
    if num_classes is not None:
        meta["num_classes"] = num_classes
    return meta


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) one training run in `workdir`; returns the final eval metrics."""
    check_config_fields(config)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create workdir {workdir!r}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK):
        raise ConfigError(f"workdir {workdir!r} is not writable")
    mesh = sharding.data_mesh()
    _check_batch_size(config, mesh)
    ds = config.dataset
    data_dir = ds.data_dir or None
    dataset = data.open_dataset(ds.name, data_dir, ds.train_fraction)
    info = dataset.info
    steps_per_epoch, total_steps = resolve_durations(config, info.num_train_examples)
    trainer = Trainer(config, info.num_classes, steps_per_epoch, total_steps, mesh,
                      num_train_examples=info.num_train_examples)
    if config.get("eval_cka_examples", 0) > 0 and trainer.teacher is None:
        raise ConfigError("eval_cka_examples compares the teacher's stages with the student's, "
                          f"but method {config.method.name!r} has no teacher")
    is_main = jax.process_index() == 0
    writer = MetricWriter(workdir, enabled=is_main)
    ckpt = checkpoint.TrainCheckpointer(workdir)
    meta = run_metadata(config, info.num_classes)

    if ckpt.latest_step() is None:
        state = trainer.init_state(config.seed)
    else:  # the newest checkpoint that passes its checksums
        latest, state = ckpt.restore_latest(trainer.abstract_state(), meta)
        log.info("resumed from %s at step %d", ckpt.directory, latest)
    step = int(jax.device_get(state.step))
    counts = trainer.count_params(state)
    log.info("student %s: %.3fM parameters; method %s: %.3fM extra trainable parameters",
                 config.student.name, counts["student"] / 1e6, config.method.name,
                 counts["method"] / 1e6)

    def eval_batches():
        return dataset.eval_batches(global_batch_size=config.eval_batch_size or config.batch_size,
                                    image_size=ds.image_size, process_index=jax.process_index(),
                                    process_count=jax.process_count())

    def evaluate():
        def accuracy(params):
            return _sum_counts(eval_batches(), lambda b: trainer.eval_step(
                params, state.model_state["student"], b), mesh)

        out = {}
        if config.get("supervised", True):  # an unsupervised student's head is untrained
            result = accuracy(state.params["student"])
            out = {"eval/top1": result["top1"], "eval/top5": result["top5"]}
            if state.ema_params is not None:
                out["eval/ema_top1"] = accuracy(state.ema_params)["top1"]
        out.update(_representation_metrics(config, trainer, state, eval_batches, dataset))
        return out

    if trainer.teacher is not None and step == 0:
        teacher = _sum_counts(eval_batches(), lambda b: trainer.teacher_eval_step(
            trainer.teacher_variables, b), mesh)
        writer.write(0, {"eval/teacher_top1": teacher["top1"],
                         "eval/teacher_top5": teacher["top5"]})

    teacher_embed_fn = None
    if trainer.teacher is not None:  # for samplers that index the data (CoSS's neighbours)
        teacher_embedding = jax.jit(lambda v, x: trainer._teacher_forward(v, x)[1]["embedding"])
        teacher_embed_fn = lambda x: teacher_embedding(  # noqa: E731
            trainer.teacher_variables, sharding.global_batch(x, mesh))
    sampler = data.make_sampler(config, workdir)
    sampler.prepare(dataset, embed_fn=teacher_embed_fn,
                    batch_size=config.eval_batch_size or config.batch_size,
                    process_count=jax.process_count())
    batches = sampler.batches(dataset, start_step=step, process_index=jax.process_index(),
                              process_count=jax.process_count(),
                              local_device_count=jax.local_device_count())
    progress = _Progress(total_steps, step, config.batch_size,
                         enabled=is_main and config.get("progress_bar", True))
    last_eval: dict = {}
    pending = []  # each step's metrics, left on the devices until the next sync
    try:
        with _StopRequests() as stop_requests:
            while step < total_steps:
                batch = sharding.global_batch(next(batches), mesh)
                state, metrics = trainer.train_step(state, trainer.teacher_variables, batch)
                step += 1
                pending.append(metrics)
                progress.update()
                stop = stop_requests.reached(step)
                last = step == total_steps
                log_now = step % config.log_every_steps == 0 or last or stop
                eval_now = (step % config.eval_every_steps == 0 or last) and not stop
                save_now = step % config.checkpoint_every_steps == 0 or last or stop
                if log_now or eval_now or save_now:
                    # The host's only syncs: a state after a non-finite step is never
                    # evaluated or saved.
                    fetched = jax.device_get(pending)
                    if not trainer.skip_nonfinite_updates:
                        _raise_if_nonfinite(fetched, step, ckpt)
                if log_now:
                    summary = _mean_metrics(fetched)
                    pending = []
                    if summary["train/nonfinite"]:
                        log.warning("skipped %d update(s) with a non-finite loss or gradient "
                                    "in the %d steps up to step %d",
                                    round(summary["train/nonfinite"] * len(fetched)),
                                    len(fetched), step)
                    writer.write(step, summary)
                    progress.loss = summary["train/loss"]
                if eval_now:
                    last_eval = evaluate()
                    writer.write(step, last_eval)
                if save_now and ckpt.latest_step() != step:
                    ckpt.save(step, state, meta)
                if stop:
                    writer.close()
                    ckpt.close()
                    raise Preempted(f"{stop_requests.reason} after step {step}, saved in "
                                    f"{ckpt.directory}; rerun the same command to continue")
    finally:
        progress.close()
    if not last_eval:  # resumed at the end: report the final evaluation again
        last_eval = evaluate()
    params = state.ema_params if state.ema_params is not None else state.params["student"]
    # Gathered on every process (a collective when the state is sharded), written by one.
    variables = sharding.to_host({"params": params, **state.model_state["student"]}, mesh)
    if is_main:
        checkpoint.save_model(os.path.join(workdir, "export"), variables,
                              model_name=config.student.name, num_classes=info.num_classes,
                              overrides=trainer.student.overrides,
                              extra={k: v for k, v in last_eval.items()})
    writer.close()
    ckpt.close()
    return last_eval


def _representation_metrics(config, trainer, state, eval_batches, dataset) -> dict:
    """k-NN top-1 of an unsupervised student's embedding, and with `eval_cka_examples` > 0 the
    teacher-student CKA per stage. Single-process only: both gather the whole split."""
    knn = not config.get("supervised", True)
    cka_examples = config.get("eval_cka_examples", 0)
    if not knn and cka_examples <= 0:
        return {}
    if jax.process_count() > 1:
        log.warning("k-NN and CKA evaluation run in single-process runs only; skipped")
        return {}
    params, student_state = state.params["student"], state.model_state["student"]
    mesh, ds, out = trainer.mesh, config.dataset, {}

    def on_mesh(images):
        return sharding.global_batch({"image": images}, mesh)

    if knn:
        train_split = dataset.centre_crop_train_batches(
            image_size=ds.image_size, batch_size=config.eval_batch_size or config.batch_size)
        out.update(training_eval.knn_metrics(
            lambda x: trainer.embed_step(params, student_state, on_mesh(x)), train_split,
            eval_batches(), dataset.info.num_classes))
    if cka_examples > 0:
        out.update(training_eval.cka_metrics(
            lambda x: trainer.layers_step(params, student_state, trainer.teacher_variables,
                                          on_mesh(x)),
            eval_batches(), cka_examples))
    return out


def _raise_if_nonfinite(fetched_metrics: list, step: int, ckpt) -> None:
    """`fetched_metrics` are those of the steps up to `step`."""
    first = step - len(fetched_metrics) + 1
    bad = [i for i, m in enumerate(fetched_metrics) if m["train/nonfinite"]]
    if bad:
        m = fetched_metrics[bad[0]]
        latest = ckpt.latest_step()
        good = "none yet" if latest is None else f"step {latest} in {ckpt.directory}"
        raise NonFiniteLossError(
            f"non-finite training loss or gradient at step {first + bad[0]} (loss "
            f"{float(m['train/loss'])}, gradient norm {float(m['train/grad_norm'])}); the "
            f"state after it was not saved. Last good checkpoint: {good}. Lower the learning "
            "rate, or set skip_nonfinite_updates=True to skip such updates")


def _mean_metrics(metrics_list):
    """Means over the steps; skipped non-finite steps count only in train/nonfinite (the
    fraction of such steps), unless every step was one."""
    finite = [m for m in metrics_list if not m["train/nonfinite"]] or metrics_list
    means = {k: float(np.mean([float(m[k]) for m in finite])) for k in metrics_list[0]}
    means["train/nonfinite"] = float(np.mean([float(m["train/nonfinite"])
                                              for m in metrics_list]))
    return means


class _StopRequests:
    """SIGTERM and SIGINT ask the loop to stop after the current step, which it checkpoints
    before raising Preempted; a second signal has its usual effect at once. With several
    processes JAX's preemption service (SIGTERM) picks the step at which all of them stop."""

    def __init__(self):
        self.reason = ""
        self._previous = {}

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        self.reason = f"stopped by {name}"
        log.warning("%s: finishing the current step, then saving a checkpoint and exiting "
                    "(a second signal stops at once)", name)
        self._restore_handlers()

    def _restore_handlers(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.reason = "preempted (SIGTERM)"
        return bool(self.reason)

    def __exit__(self, *exc_info):
        self._restore_handlers()


class _Progress:
    """tqdm bar with images/s, the latest loss and ETA; a no-op when disabled."""

    def __init__(self, total, initial, batch_size, enabled):
        self._bar = None
        self._batch_size = batch_size
        self._start, self._done = time.perf_counter(), 0
        self.loss = float("nan")
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    def update(self):
        self._done += 1
        if self._bar is not None:
            rate = self._done * self._batch_size / (time.perf_counter() - self._start)
            self._bar.set_postfix_str(f"{rate:.0f} img/s, loss {self.loss:.4f}", refresh=False)
            self._bar.update()

    def close(self):
        if self._bar is not None:
            self._bar.close()
