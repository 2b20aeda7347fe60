"""The training loop: supervised training of one model, or distillation from a frozen teacher.

`train_and_evaluate(config, workdir)` checks the config, builds the pure step
(jaxkd.step), restores or initialises the state, then loops: step, log, evaluate
(jaxkd.evaluators), checkpoint. Which method is used is data (`config.method.name`): what
the run does differently for a method comes from the method's registered Requirements.
What the loop trains is one student (`OneStudent`) or, for a config with `population`
seeds or a sweep, a population of students sharing the teacher's forward
(jaxkd.population.Population): both answer the same calls.
"""

from __future__ import annotations

import logging
import os

import jax

from jaxkd import (build, checkpoint, data, distill, evaluators, lifecycle, population,
                   run_config, sharding, step)
from jaxkd.errors import ConfigError, Preempted
from jaxkd.metric_writer import MetricWriter

log = logging.getLogger(__name__)


def _prepare_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create workdir {workdir!r}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK):
        raise ConfigError(f"workdir {workdir!r} is not writable")


def _train_batches(config, workdir, dataset, setup, teacher_variables, start_step):
    """The train batches of the run's sampler (the method's unless config.dataset.sampler
    names one), prepared (a neighbour index built with the teacher) and resumed at
    `start_step`."""
    sampler = data.make_sampler(config, workdir,
                                config.dataset.get("sampler", "") or setup.requires.sampler)
    teacher_embed_fn = None
    if setup.teacher is not None:  # samplers that index the data (CoSS's neighbours)
        embed = jax.jit(lambda v, x: step.teacher_forward(setup, v, x)[1]["embedding"])
        teacher_embed_fn = lambda x: embed(  # noqa: E731
            teacher_variables, sharding.global_batch({"image": x}, setup.mesh)["image"])
    sampler.prepare(dataset, embed_fn=teacher_embed_fn,
                    batch_size=config.eval_batch_size or config.batch_size,
                    process_count=jax.process_count())
    return sampler.batches(dataset, start_step=start_step, process_index=jax.process_index(),
                           process_count=jax.process_count(),
                           local_device_count=jax.local_device_count())


class OneStudent:
    """What the loop trains in a run without a population: one student (jaxkd.step). The
    loop's other trainee, with the same methods, is jaxkd.population.Population."""

    def __init__(self, config, num_classes: int, steps_per_epoch: int, total_steps: int,
                 mesh, *, num_train_examples: int = 0, train_labels=None):
        self.setup, self.teacher_variables = step.build(
            config, num_classes, steps_per_epoch, total_steps, mesh,
            num_train_examples=num_train_examples, train_labels=train_labels)
        self.seed = config.seed
        self.num_classes = num_classes

    def init_state(self):
        return step.init_state(self.setup, self.seed)

    def abstract_state(self):
        return step.abstract_state(self.setup)

    def current_step(self, state) -> int:
        return int(jax.device_get(state.step))

    def log_size(self, state, config) -> None:
        counts = step.count_params(state)
        log.info("student %s: %.3fM parameters; method %s: %.3fM extra trainable parameters",
                 config.student.name, counts["student"] / 1e6, config.method.name,
                 counts["method"] / 1e6)

    def jit_train_step(self):
        return step.jit_train_step(self.setup)

    def check_nonfinite(self, fetched: list, step_count: int, ckpt) -> None:
        lifecycle.raise_if_nonfinite(fetched, step_count, ckpt)

    def write_train(self, writer, step_count: int, fetched: list) -> float:
        summary = lifecycle.mean_metrics(fetched)
        if summary["train/nonfinite"]:
            log.warning("skipped %d update(s) with a non-finite loss or gradient in the %d "
                        "steps up to step %d", round(summary["train/nonfinite"] * len(fetched)),
                        len(fetched), step_count)
        writer.write(step_count, summary)
        return summary["train/loss"]

    def evaluate(self, evals, state) -> dict:
        return evaluators.evaluate(evals, state)

    def write_eval(self, writer, step_count: int, result: dict) -> None:
        writer.write(step_count, result)

    def export(self, out_dir: str, state, result: dict, extra: dict, write: bool) -> None:
        """The student (its EMA when kept) as a model export. Every process calls it (a
        collective when the state is sharded); `write` on one."""
        params = state.ema_params if state.ema_params is not None else state.params["student"]
        variables = sharding.to_host({"params": params, **state.model_state["student"]},
                                     self.setup.mesh)
        if write:
            checkpoint.save_model(out_dir, variables, model_name=self.setup.student.name,
                                  num_classes=self.num_classes,
                                  overrides=self.setup.student.overrides,
                                  extra={**result, **extra})

    def result(self, state, result: dict, teacher_metrics: dict) -> dict:
        del state
        return {**result, **teacher_metrics}


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) one training run in `workdir`, of one student or of a population
    (jaxkd.population); returns the final eval metrics (a population's: per member)."""
    run_config.check_config_fields(config)
    run_config.check_config_values(config)
    _prepare_workdir(workdir)
    is_population = run_config.is_population(config)
    mesh = population.mesh(config) if is_population else sharding.data_mesh()
    run_config.check_batch_size(config, mesh)
    ds = config.dataset
    data_dir = ds.data_dir or None
    dataset = data.open_dataset(ds.name, data_dir, ds.train_fraction)
    info = dataset.info
    steps_per_epoch, total_steps = run_config.resolve_durations(config,
                                                                info.num_train_examples)
    requires = distill.method_requirements(config.method.name)
    trainee = (population.Population if is_population else OneStudent)(
        config, info.num_classes, steps_per_epoch, total_steps, mesh,
        num_train_examples=info.num_train_examples,
        train_labels=dataset.train_labels() if requires.train_labels else None)
    setup, teacher_variables = trainee.setup, trainee.teacher_variables
    eval_batch_size = config.eval_batch_size or config.batch_size
    view = build.eval_view(config.student.name)
    eval_ctx = evaluators.EvalContext(
        config=config, setup=setup, teacher_variables=teacher_variables,
        num_classes=info.num_classes,
        eval_batches=lambda: dataset.eval_batches(
            global_batch_size=eval_batch_size, image_size=ds.image_size,
            process_index=jax.process_index(), process_count=jax.process_count(), view=view),
        train_batches=lambda: dataset.centre_crop_train_batches(
            image_size=ds.image_size, batch_size=eval_batch_size, view=view))
    evals = evaluators.build_evaluators(eval_ctx)
    is_main = jax.process_index() == 0
    writer = MetricWriter(workdir, enabled=is_main)
    ckpt = checkpoint.TrainCheckpointer(workdir)
    meta = run_config.run_metadata(config, info.num_classes)

    if ckpt.latest_step() is None:
        state = trainee.init_state()
    else:  # the newest checkpoint that passes its checksums
        latest, state = ckpt.restore_latest(trainee.abstract_state(), meta)
        log.info("resumed from %s at step %d", ckpt.directory, latest)
    start = trainee.current_step(state)
    trainee.log_size(state, config)

    teacher_metrics = {}
    if setup.teacher is not None and setup.teacher.num_classes:
        # measured (and checked) at every start, logged at step 0; a headless teacher has none
        teacher_metrics = evaluators.evaluate_teacher(eval_ctx)
        if start == 0:
            writer.write(0, teacher_metrics)

    batches = _train_batches(config, workdir, dataset, setup, teacher_variables, start)
    state, last_eval = _loop(config, trainee, state, teacher_variables, batches, evals, writer,
                             ckpt, meta, total_steps, is_main)
    if not last_eval:  # resumed at the end: report the final evaluation again
        last_eval = trainee.evaluate(evals, state)
    trainee.export(os.path.join(workdir, "export"), state, last_eval,
                   _distilled_from(config, teacher_metrics), write=is_main)
    writer.close()
    ckpt.close()
    return trainee.result(state, last_eval, teacher_metrics)


def _distilled_from(config, teacher_metrics) -> dict:
    """What a student export records of its teacher: every result states its source."""
    if not teacher_metrics:
        return {}
    return {"teacher": config.teacher.name, "teacher_checkpoint": config.teacher.checkpoint,
            "teacher_top1": teacher_metrics["eval/teacher_top1"]}


def _loop(config, trainee, state, teacher_variables, batches, evals, writer, ckpt, meta,
          total_steps, is_main):
    """Steps until `total_steps`; returns (state, the last evaluation's metrics)."""
    train_step = trainee.jit_train_step()
    mesh = trainee.setup.mesh
    step_count = trainee.current_step(state)
    skip_nonfinite = config.get("skip_nonfinite_updates", False)
    progress = lifecycle.Progress(total_steps, step_count, config.batch_size,
                                  enabled=is_main and config.get("progress_bar", True))
    last_eval = {}
    pending = []  # each step's metrics, left on the devices until the next sync
    try:
        with lifecycle.StopRequests() as stop_requests:
            while step_count < total_steps:
                batch = sharding.global_batch(next(batches), mesh)
                state, metrics = train_step(state, teacher_variables, batch)
                step_count += 1
                pending.append(metrics)
                progress.update()
                stop = stop_requests.reached(step_count)
                last = step_count == total_steps
                log_now = step_count % config.log_every_steps == 0 or last or stop
                eval_now = (step_count % config.eval_every_steps == 0 or last) and not stop
                save_now = step_count % config.checkpoint_every_steps == 0 or last or stop
                if log_now or eval_now or save_now:
                    # The host's only syncs: a state after a non-finite step is never
                    # evaluated or saved (a population's member is frozen before it).
                    fetched = jax.device_get(pending)
                    if not skip_nonfinite:
                        trainee.check_nonfinite(fetched, step_count, ckpt)
                if log_now:
                    progress.loss = trainee.write_train(writer, step_count, fetched)
                    pending = []
                if eval_now:
                    last_eval = trainee.evaluate(evals, state)
                    trainee.write_eval(writer, step_count, last_eval)
                if save_now and ckpt.latest_step() != step_count:
                    ckpt.save(step_count, state, meta)
                if stop:
                    writer.close()
                    ckpt.close()
                    raise Preempted(f"{stop_requests.reason} after step {step_count}, saved "
                                    f"in {ckpt.directory}; rerun the same command to continue")
    finally:
        progress.close()
    return state, last_eval
