"""Population training: many students of one teacher in one jitted step.

A run whose config sets `population.seeds` and/or `population.sweep` trains the product of the
seeds and the swept values, its members, together: one compiled step runs the frozen teacher
once on the batch and then, for every member, the student's forward/backward, the method, the
optimiser and the EMA. The members share the batches (drawn with `config.seed`) and differ in
their initialisation, dropout and method randomness (their seed) and in their swept values;
each one computes what a run of its own with that seed and those values computes
(tests/test_population.py). Methods that re-run the teacher with their own parts (PAT) re-run
it per member; the plain teacher outputs are shared.

The train state holds the members on a leading axis: every array of `PopulationState.members`
(parameters, optimiser state, BN statistics, memory banks, per-example state, EMA) has one row
per member. How the step goes over them (`population.map`) is a measured choice
(docs/benchmarks.md): "loop" unrolls a Python loop over the members in the one program, each
member with its own method and optimiser built from its own config (any sweep); "vmap" maps
one program over them (seeds only), which the member axis of a 2-D mesh needs.

`population.sweep` may set any scalar the step reads: a method's numeric fields (loss weights,
temperatures, kappa, gamma/eps), `label_smoothing`, the optimiser's numeric fields (lr,
weight_decay, ...: each member's schedule is built from its own values) and `ema_decay`. A
field that changes the models, the method, the batches or the shapes of the state is refused:
such comparisons are suites of populations (`runs` + `run_order`).

A member whose loss or gradient turns non-finite is frozen at its last finite state and
reported (step and value) while the others train on; the run stops only when every member is
frozen (or, with `skip_nonfinite_updates`, such updates are skipped and counted per member).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxkd import checkpoint, distill, lifecycle, recipes, run_config, sharding, step
from jaxkd.errors import ConfigError, NonFiniteLossError

log = logging.getLogger(__name__)

MAPS = ("loop", "vmap")
# Top-level fields a population may sweep; besides these, the numeric fields of the method
# and of the optimiser.
_SWEEPABLE_FIELDS = ("label_smoothing", "ema_decay")
_SWEEPABLE_SECTIONS = ("method", "optimizer")
_SUITE_HINT = ("make a suite of populations instead: one population per value in config.runs, "
               "listed in config.run_order")


# --- the members -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Member:
    index: int
    seed: int
    settings: dict  # {swept field path: this member's value}
    config: Any  # the run config with this member's seed and values

    @property
    def label(self) -> str:
        values = ", ".join(f"{path}={value:g}" for path, value in self.settings.items())
        return f"member {self.index} (seed {self.seed}{', ' + values if values else ''})"

    @property
    def labels(self) -> dict:
        """What each of its metrics rows records besides the metrics."""
        return {"member": self.index, "seed": self.seed, "settings": dict(self.settings)}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_sweep_field(config, path: str, values) -> None:
    section, _, name = path.rpartition(".")
    if path == "seed":
        raise ConfigError("population.sweep cannot sweep seed: list the seeds in "
                          "population.seeds")
    if section == "method" and name != "name" and \
            name not in distill.method_entry(config.method.name).config_fields():
        raise ConfigError(f"population.sweep: method {config.method.name!r} has no field "
                          f"{name!r}")
    try:
        current = run_config.field_value(config, path)
    except (KeyError, AttributeError):
        raise ConfigError(f"population.sweep: the config has no field {path}") from None
    if not ((path in _SWEEPABLE_FIELDS or section in _SWEEPABLE_SECTIONS) and
            _is_number(current)):
        raise ConfigError(f"population.sweep cannot sweep {path}: it changes the models, the "
                          "method, the batches the members share or the shapes of the train "
                          f"state; {_SUITE_HINT}")
    if not isinstance(values, (tuple, list)) or not values or \
            not all(_is_number(v) and math.isfinite(v) for v in values):
        raise ConfigError(f"population.sweep: {path} needs a non-empty tuple of finite "
                          f"numbers, got {values!r}")
    if isinstance(current, int) and not all(float(v).is_integer() for v in values):
        raise ConfigError(f"population.sweep: {path} is an integer field, got {tuple(values)}")
    if len(set(values)) != len(values):
        raise ConfigError(f"population.sweep: {path} repeats a value: {tuple(values)}")


def _member_config(config, seed: int, settings: dict):
    member = copy.deepcopy(config)
    with member.unlocked():
        member.seed = seed
        member.population = recipes.base_config().population
        for path, value in settings.items():
            section, _, name = path.rpartition(".")
            target = run_config.field_value(member, section) if section else member
            target[name] = type(target[name])(value)
    return member


def members(config) -> list[Member]:
    """The population's members: the swept values' product (in the order of the fields'
    paths), and for each setting every seed. Refuses what a population cannot sweep."""
    pop = config.population
    seeds = tuple(pop.seeds) or (config.seed,)
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or \
            len(set(seeds)) != len(seeds):
        raise ConfigError(f"population.seeds must be distinct integers, got {tuple(pop.seeds)}")
    sweep = run_config.population_sweep(config)
    for path, values in sweep.items():
        _check_sweep_field(config, path, values)
    if pop.map not in MAPS:
        raise ConfigError(f"population.map must be one of {MAPS}, got {pop.map!r}")
    if pop.map == "vmap" and sweep:
        raise ConfigError("population.map='vmap' maps one program over the members, so they "
                          f"may differ only in their seeds; sweep {', '.join(sweep)} with "
                          "map='loop'")
    if pop.member_devices < 1:
        raise ConfigError(f"population.member_devices must be >= 1, got {pop.member_devices}")
    if pop.member_devices > 1 and pop.map != "vmap":
        raise ConfigError("population.member_devices > 1 spreads the members over groups of "
                          "devices, which needs map='vmap' (an unrolled loop runs every member "
                          "on every device)")
    result = []
    for values in itertools.product(*sweep.values()):
        settings = dict(zip(sweep, values))
        for seed in seeds:
            member = Member(len(result), seed, settings, _member_config(config, seed, settings))
            try:
                run_config.check_config_values(member.config)
            except ConfigError as e:
                raise ConfigError(f"{member.label}: {e}") from None
            result.append(member)
    if pop.member_devices > 1 and len(result) % pop.member_devices:
        raise ConfigError(f"population.member_devices={pop.member_devices} must divide the "
                          f"{len(result)} members")
    return result


def mesh(config, devices=None):
    """The data mesh, or with `population.member_devices` = M > 1 a 2-D (member, data) mesh
    of M groups of devices, each holding M-th of the members."""
    devices = jax.devices() if devices is None else devices
    groups = config.population.member_devices
    if groups == 1:
        return sharding.data_mesh(devices)
    if len(devices) % groups:
        raise ConfigError(f"population.member_devices={groups} must divide the "
                          f"{len(devices)} devices")
    return sharding.Mesh(np.asarray(devices).reshape(groups, -1),
                         (sharding.MEMBER_AXIS, sharding.DATA_AXIS))


# --- the state and the step --------------------------------------------------------------------
@struct.dataclass
class PopulationState:
    members: step.TrainState  # every array with a leading member axis
    # The step whose loss or gradient was non-finite for each member (0: training), and those
    # values: such a member keeps the state it had before that step.
    frozen_step: jax.Array
    frozen_loss: jax.Array
    frozen_grad_norm: jax.Array


@dataclasses.dataclass(frozen=True)
class PopulationSetup:
    mesh: Any
    members: tuple[Member, ...]
    setups: tuple[step.Setup, ...]  # one per member: its method, optimiser and EMA
    map: str
    freeze: bool  # False (skip_nonfinite_updates): skip a non-finite update, freeze nobody
    state_shardings: Any = None

    @property
    def size(self) -> int:
        return len(self.members)


def _leaf_shapes(setup: step.Setup) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(step.abstract_state(setup))
    return {jax.tree_util.keystr(path): (x.shape, x.dtype) for path, x in leaves}


def _check_same_state(members, setups) -> None:
    """Members are stacked on one axis: their states must have the same arrays."""
    reference = _leaf_shapes(setups[0])
    for member, setup in zip(members[1:], setups[1:]):
        shapes = _leaf_shapes(setup)
        if shapes == reference:
            continue
        where = sorted(set(shapes) ^ set(reference)) or \
            sorted(k for k in shapes if shapes[k] != reference[k])
        fields = [p for p in member.settings if member.settings[p] != members[0].settings[p]]
        raise ConfigError(
            f"population.sweep: {', '.join(fields)} change(s) the train state's arrays "
            f"({member.label} differs from member 0 at {where[0]}); {_SUITE_HINT}")


def _member_axis(mesh_) -> str | None:
    """The mesh axis the members are split over; None on the data mesh (each device holds
    every member)."""
    return sharding.MEMBER_AXIS if sharding.MEMBER_AXIS in mesh_.axis_names else None


def _stacked_sharding(sharding_, axis):
    return NamedSharding(sharding_.mesh, P(axis, *sharding_.spec))


def build(config, num_classes: int, steps_per_epoch: int, total_steps: int, mesh_, *,
          num_train_examples: int = 0, train_labels=None):
    """(PopulationSetup, teacher variables on the mesh or None): each member's step.Setup,
    the teacher loaded once."""
    population_members = members(config)
    setups, teacher_variables = [], None
    for member in population_members:
        setup, teacher_variables = step.build(
            member.config, num_classes, steps_per_epoch, total_steps, mesh_,
            num_train_examples=num_train_examples, train_labels=train_labels,
            loaded_teacher=(setups[0], teacher_variables) if setups else None)
        setups.append(setup)
    _check_same_state(population_members, setups)
    member_axis = _member_axis(mesh_)
    members_shardings = jax.tree.map(lambda s: _stacked_sharding(s, member_axis),
                                     setups[0].state_shardings)
    psetup = PopulationSetup(mesh=mesh_, members=tuple(population_members),
                             setups=tuple(setups), map=config.population.map,
                             freeze=not config.get("skip_nonfinite_updates", False))
    member_vector = NamedSharding(mesh_, P(member_axis))
    state_shardings = PopulationState(members=members_shardings, frozen_step=member_vector,
                                      frozen_loss=member_vector, frozen_grad_norm=member_vector)
    return dataclasses.replace(psetup, state_shardings=state_shardings), teacher_variables


def init_state(psetup: PopulationSetup) -> PopulationState:
    """Each member's step.initial_state from its seed, stacked."""

    def init():
        images = step.zero_images(psetup.setups[0])
        states = [step.initial_state(setup, jax.random.PRNGKey(member.seed), images)
                  for setup, member in zip(psetup.setups, psetup.members)]
        zeros = jnp.zeros((psetup.size,), jnp.float32)
        return PopulationState(members=_stack(states),
                               frozen_step=jnp.zeros((psetup.size,), jnp.int32),
                               frozen_loss=zeros, frozen_grad_norm=zeros)

    return jax.jit(init, out_shardings=psetup.state_shardings)()


def abstract_state(psetup: PopulationSetup):
    """The state's shapes and shardings, to restore a checkpoint onto."""
    k, shardings = psetup.size, psetup.state_shardings
    members_ = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct((k, *s.shape), s.dtype, sharding=sh),
        step.abstract_state(psetup.setups[0]), shardings.members)
    vector = lambda dtype, sh: jax.ShapeDtypeStruct((k,), dtype, sharding=sh)  # noqa: E731
    return PopulationState(members=members_,
                           frozen_step=vector(jnp.int32, shardings.frozen_step),
                           frozen_loss=vector(jnp.float32, shardings.frozen_loss),
                           frozen_grad_norm=vector(jnp.float32, shardings.frozen_grad_norm))


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member_state(state: PopulationState, index: int) -> step.TrainState:
    """One member's TrainState (what evaluators and exports take)."""
    return jax.tree.map(lambda x: x[index], state.members)


def _teacher_view(psetup: PopulationSetup, teacher_variables, images):
    """The teacher once on the batch; on a 2-D mesh split over every device, then its outputs
    resharded to the students' layout (split over the data axis, whole in each member group),
    so spreading the members over devices does not repeat it."""
    setup = psetup.setups[0]
    if setup.teacher is None:
        return None
    if _member_axis(psetup.mesh) is None:
        return step.teacher_view(setup, teacher_variables, images)
    everywhere = NamedSharding(psetup.mesh, P((sharding.MEMBER_AXIS, sharding.DATA_AXIS)))
    logits, features = step.teacher_forward(
        setup, teacher_variables, jax.lax.with_sharding_constraint(images, everywhere))
    logits, features = jax.lax.with_sharding_constraint(
        (logits, features), sharding.batch_sharding(psetup.mesh))
    rerun = None
    if setup.requires.teacher == "rerun":
        rerun = functools.partial(step.teacher_forward, setup, teacher_variables, images)
    return distill.TeacherView(logits, features, rerun=rerun)


def train_step(psetup: PopulationSetup, state: PopulationState, teacher_variables, batch):
    """One update of every member; returns (new state, metrics with one value per member)."""
    teacher = _teacher_view(psetup, teacher_variables, batch["image"])
    if psetup.map == "loop":
        results = [step.update(setup, member_state(state, i), teacher, batch)
                   for i, setup in enumerate(psetup.setups)]
        members_, metrics = _stack([r[0] for r in results]), _stack([r[1] for r in results])
    else:
        members_, metrics = jax.vmap(
            lambda s: step.update(psetup.setups[0], s, teacher, batch),
            spmd_axis_name=_member_axis(psetup.mesh))(state.members)
    return _freeze(psetup, state, members_, metrics)


def _freeze(psetup, old: PopulationState, members_, metrics):
    """A frozen member keeps its state (but for the step counter); a member whose loss or
    gradient is non-finite now is frozen from this step on (unless non-finite updates are
    only skipped: step.update already left its state as it was)."""
    frozen = old.frozen_step > 0
    kept = old.members.replace(step=members_.step)

    def select(new, previous):
        return jnp.where(frozen.reshape(frozen.shape + (1,) * (new.ndim - 1)), previous, new)

    members_ = jax.tree.map(select, members_, kept)
    newly = (metrics["train/nonfinite"] > 0) & ~frozen & psetup.freeze
    frozen_step = jnp.where(newly, members_.step, old.frozen_step)
    state = PopulationState(
        members=members_, frozen_step=frozen_step,
        frozen_loss=jnp.where(newly, metrics["train/loss"], old.frozen_loss),
        frozen_grad_norm=jnp.where(newly, metrics["train/grad_norm"], old.frozen_grad_norm))
    return state, {**metrics, "train/frozen_step": frozen_step}


def jit_train_step(psetup: PopulationSetup):
    """`train_step` jitted for the mesh, the state donated."""
    repl = sharding.replicated(psetup.mesh)
    teacher_shardings = psetup.setups[0].teacher_shardings or repl
    return jax.jit(functools.partial(train_step, psetup),
                   in_shardings=(psetup.state_shardings, teacher_shardings,
                                 sharding.batch_sharding(psetup.mesh)),
                   out_shardings=(psetup.state_shardings, repl), donate_argnums=(0,))


# --- what the training loop calls --------------------------------------------------------------
class Population:
    """What the loop (jaxkd.train) trains for a population config: the members' step, their
    metrics rows, evaluations and exports. The loop's other trainee is train.OneStudent."""

    def __init__(self, config, num_classes: int, steps_per_epoch: int, total_steps: int,
                 mesh_, *, num_train_examples: int = 0, train_labels=None):
        self.psetup, self.teacher_variables = build(
            config, num_classes, steps_per_epoch, total_steps, mesh_,
            num_train_examples=num_train_examples, train_labels=train_labels)
        self.setup = self.psetup.setups[0]  # what the batches and the evaluators read
        self.members = self.psetup.members
        self.num_classes = num_classes

    def init_state(self) -> PopulationState:
        return init_state(self.psetup)

    def abstract_state(self):
        return abstract_state(self.psetup)

    def current_step(self, state: PopulationState) -> int:
        return int(jax.device_get(state.members.step[0]))

    def log_size(self, state: PopulationState, config) -> None:
        counts = step.count_params(member_state(state, 0))
        sweep = run_config.population_sweep(config)
        log.info("population of %d members (seeds %s%s), %s over them; each: student %s "
                 "%.3fM parameters, method %s %.3fM extra trainable parameters",
                 len(self.members), sorted({m.seed for m in self.members}),
                 "".join(f", {p} {tuple(v)}" for p, v in sweep.items()), self.psetup.map,
                 config.student.name, counts["student"] / 1e6, config.method.name,
                 counts["method"] / 1e6)

    def jit_train_step(self):
        return jit_train_step(self.psetup)

    @staticmethod
    def _trained(fetched, first_step: int, index: int) -> list[dict]:
        """Member `index`'s metrics of the steps it trained in (frozen at them or after)."""
        rows = []
        for step_number, metrics in enumerate(fetched, first_step):
            frozen_at = int(metrics["train/frozen_step"][index])
            if frozen_at in (0, step_number):
                rows.append({k: v[index] for k, v in metrics.items()
                             if k != "train/frozen_step"})
        return rows

    def check_nonfinite(self, fetched: list, step_count: int, ckpt) -> None:
        """Reports members frozen in these steps; stops the run once every member is."""
        first = step_count - len(fetched) + 1
        frozen_steps = np.asarray(fetched[-1]["train/frozen_step"])
        for member in self.members:
            at = int(frozen_steps[member.index])
            if first <= at <= step_count:
                metrics = fetched[at - first]
                log.warning("%s frozen at step %d: non-finite loss %s (gradient norm %s); it "
                            "keeps its state from before that step, the other members train on",
                            member.label, at, float(metrics["train/loss"][member.index]),
                            float(metrics["train/grad_norm"][member.index]))
        if self.psetup.freeze and np.all(frozen_steps > 0):
            latest = ckpt.latest_step()
            good = "none yet" if latest is None else f"step {latest} in {ckpt.directory}"
            raise NonFiniteLossError(
                "every member of the population has a non-finite training loss or gradient: " +
                "; ".join(f"{m.label} at step {int(frozen_steps[m.index])}"
                          for m in self.members) +
                f". Last checkpoint: {good}. Lower the learning rate")

    def write_train(self, writer, step_count: int, fetched: list) -> float:
        """Each training member's means over these steps; returns their mean loss."""
        first = step_count - len(fetched) + 1
        losses = []
        for member in self.members:
            rows = self._trained(fetched, first, member.index)
            if not rows:
                continue
            summary = lifecycle.mean_metrics(rows)
            if summary["train/nonfinite"] and not self.psetup.freeze:
                log.warning("%s: skipped %d update(s) with a non-finite loss or gradient in "
                            "the %d steps up to step %d", member.label,
                            round(summary["train/nonfinite"] * len(rows)), len(rows),
                            step_count)
            writer.write(step_count, summary, labels=member.labels,
                         run=f"member_{member.index}")
            losses.append(summary["train/loss"])
        return float(np.mean(losses)) if losses else float("nan")

    def evaluate(self, evals, state: PopulationState) -> list[dict]:
        from jaxkd import evaluators

        return [evaluators.evaluate(evals, member_state(state, m.index)) for m in self.members]

    def write_eval(self, writer, step_count: int, results: list[dict]) -> None:
        for member, result in zip(self.members, results):
            writer.write(step_count, result, labels=member.labels, run=f"member_{member.index}")

    def _frozen(self, state: PopulationState) -> list[dict | None]:
        steps, losses, norms = jax.device_get((state.frozen_step, state.frozen_loss,
                                               state.frozen_grad_norm))
        return [None if not steps[i] else
                {"step": int(steps[i]), "loss": float(losses[i]), "grad_norm": float(norms[i])}
                for i in range(len(self.members))]

    def export(self, out_dir: str, state: PopulationState, results: list[dict], extra: dict,
               write: bool) -> None:
        """`out_dir`/member_<i>/: each member's student (its EMA when kept), with its seed,
        swept values and results in model.json. Every process calls it; `write` on one."""
        frozen = self._frozen(state)
        for member, result in zip(self.members, results):
            one = member_state(state, member.index)
            params = one.ema_params if one.ema_params is not None else one.params["student"]
            variables = sharding.to_host({"params": params, **one.model_state["student"]},
                                         self.psetup.mesh)
            if write:
                checkpoint.save_model(
                    os.path.join(out_dir, f"member_{member.index}"), variables,
                    model_name=self.setup.student.name, num_classes=self.num_classes,
                    overrides=self.setup.student.overrides,
                    extra={**result, **extra, **member.labels,
                           "frozen": frozen[member.index]})

    def result(self, state: PopulationState, results: list[dict], teacher_metrics: dict
               ) -> dict:
        """The run's return value: the teacher's metrics and each member's final results."""
        frozen = self._frozen(state)
        return {**teacher_metrics, "population": [
            {**member.labels, "frozen": frozen[member.index], **result}
            for member, result in zip(self.members, results)]}


# --- summaries ---------------------------------------------------------------------------------
def headline_metric(result: dict) -> str:
    """eval/top1, or eval/knn_top1 for an unsupervised run (its head is never trained)."""
    return "eval/top1" if "eval/top1" in result else "eval/knn_top1"


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def setting_rows(population_result: list[dict]) -> list[dict]:
    """One row per setting of a population's members (in member order): the headline
    metric's mean and std over the seeds of the members that were not frozen, their number n,
    the best member, and the frozen members."""
    rows: dict[str, dict] = {}
    for member in population_result:
        key = repr(sorted(member["settings"].items()))
        row = rows.setdefault(key, {"settings": member["settings"], "members": [],
                                    "frozen": []})
        (row["frozen"] if member["frozen"] else row["members"]).append(member)
    out = []
    for row in rows.values():
        finished = row["members"]
        metric = headline_metric(finished[0] if finished else row["frozen"][0])
        values = [m[metric] for m in finished]
        mean, std = mean_std(values) if values else (float("nan"), float("nan"))
        best = max(finished, key=lambda m: m[metric]) if finished else None
        out.append({"settings": row["settings"], "metric": metric, "n": len(values),
                    "mean": mean, "std": std, "values": values,
                    "best": None if best is None else {"member": best["member"],
                                                       "seed": best["seed"],
                                                       "value": best[metric]},
                    "frozen": [{"member": m["member"], "seed": m["seed"], **m["frozen"]}
                               for m in row["frozen"]]})
    return out
