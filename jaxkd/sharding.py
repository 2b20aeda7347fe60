"""A 1-D data mesh over every device (all processes), the shardings the trainer uses, and the
multi-process start-up.

Two strategies place the train state on the mesh: "data" replicates it on every device (plain
data parallelism); "fsdp" splits each parameter and optimiser-state array along its largest
dimension divisible by the device count (replicating the arrays none of whose dimensions
divide), so each device holds about 1/N of the state and XLA gathers the parameters where the
step needs them. The batch is split over the same axis either way, so both compute the same
step.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxkd.errors import ConfigError

DATA_AXIS = "data"
MEMBER_AXIS = "member"  # a population's members (jaxkd.population), on a 2-D mesh
STRATEGIES = ("data", "fsdp")

# Environment variables that start a multi-process run when the config leaves it unset.
ENV_COORDINATOR = "JAXKD_COORDINATOR"
ENV_NUM_PROCESSES = "JAXKD_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXKD_PROCESS_ID"
ENV_AUTO_DETECT = "JAXKD_DISTRIBUTED_AUTO"


def data_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles each process's numpy batch into one global array sharded over the batch axis."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                        local_batch)


def check_strategy(strategy: str, field: str = "sharding") -> str:
    if strategy not in STRATEGIES:
        raise ConfigError(f"config.{field} must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


def fsdp_spec(shape: tuple[int, ...], num_shards: int) -> P:
    """Splits the largest dimension that `num_shards` divides (the first of equal ones);
    P() (replicated) when no dimension divides."""
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] >= num_shards and shape[dim] % num_shards == 0:
            return P(*(DATA_AXIS if d == dim else None for d in range(len(shape))))
    return P()


def tree_shardings(shapes: Any, mesh: Mesh, strategy: str) -> Any:
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs under `strategy`."""
    check_strategy(strategy)
    if strategy == "data":
        return jax.tree.map(lambda _: replicated(mesh), shapes)
    num_shards = mesh.shape[DATA_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), num_shards)),
                        shapes)


def gathered(tree: Any, mesh: Mesh) -> Any:
    """Inside a jitted step: `tree` whole on every device where it is used. Under FSDP this is
    the all-gather before the compute; without it XLA would carry the parameters' sharding
    into the activations and mix it with the batch sharding (slow resharding copies)."""
    return jax.lax.with_sharding_constraint(tree, replicated(mesh))


def put(tree: Any, shardings: Any) -> Any:
    """Host arrays (the same on every process) onto `shardings`; each process fills only its
    own devices, so this also works when the shardings span several processes."""
    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def to_host(tree: Any, mesh: Mesh) -> Any:
    """Every array as one full numpy copy on every process. Sharded arrays are gathered first
    (a collective: every process must call this)."""
    gathered = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), gathered)


def distributed_settings(config, environ: Mapping[str, str] = os.environ) -> dict | None:
    """Keyword arguments for `jax.distributed.initialize`, or None for a single process.

    From `config.distributed` (a suite takes its first run's) where set, else from the
    JAXKD_COORDINATOR / JAXKD_NUM_PROCESSES / JAXKD_PROCESS_ID variables. All three must be
    given together. `auto_detect` (or JAXKD_DISTRIBUTED_AUTO=1) leaves everything to JAX's
    own cluster detection (SLURM, Open MPI, Cloud TPU, ...).
    """
    settings = config.get("distributed")
    if settings is None and "runs" in config and config.get("run_order"):
        settings = config.runs[config.run_order[0]].get("distributed")
    settings = settings or {}
    coordinator = settings.get("coordinator_address", "") or environ.get(ENV_COORDINATOR, "")
    num_processes = settings.get("num_processes", 0) or int(environ.get(ENV_NUM_PROCESSES, 0))
    process_id = settings.get("process_id", -1)
    if process_id < 0:
        process_id = int(environ.get(ENV_PROCESS_ID, -1))
    if coordinator or num_processes or process_id >= 0:
        missing = [name for name, unset in (("coordinator_address", not coordinator),
                                            ("num_processes", num_processes < 1),
                                            ("process_id", process_id < 0)) if unset]
        if missing:
            raise ConfigError(f"a multi-process run needs config.distributed.{', '.join(missing)}"
                              f" (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
        if process_id >= num_processes:
            raise ConfigError(f"process_id {process_id} is not below num_processes "
                              f"{num_processes}")
        return {"coordinator_address": coordinator, "num_processes": num_processes,
                "process_id": process_id}
    if settings.get("auto_detect", False) or environ.get(ENV_AUTO_DETECT, "") == "1":
        return {}
    return None


def initialize_distributed(config) -> bool:
    """Starts JAX's multi-process runtime when the config or environment asks for it; must run
    before anything touches a device. Returns whether it did (False when already running)."""
    settings = distributed_settings(config)
    if settings is None or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(**settings)
    return True
