"""FSDP against data parallelism on 8 fake devices, and the multi-process settings."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxkd import checkpoint, recipes, run_config, sharding, step
from jaxkd.errors import ConfigError

from helpers import random_batches, random_teacher, tiny_config


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return random_teacher(str(tmp_path_factory.mktemp("teacher")), num_classes=10)


def test_fsdp_spec_splits_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((3, 3, 64, 128), 8) == P(None, None, None, "data")
    assert sharding.fsdp_spec((10, 64), 8) == P(None, "data")  # 10 is larger than 8 but odd
    assert sharding.fsdp_spec((96, 96), 8) == P("data", None)  # ties: the first
    assert sharding.fsdp_spec((100, 6), 8) == P()  # nothing divides: replicated
    assert sharding.fsdp_spec((4,), 8) == P()
    assert sharding.fsdp_spec((), 8) == P()


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="teacher_sharding must be one of"):
        sharding.check_strategy("zero3", "teacher_sharding")


def _per_device_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_fsdp_and_data_parallel_take_the_same_steps(tmp_path, teacher_dir):
    mesh = sharding.data_mesh()
    batches = random_batches(3)
    losses, states, trainers = {}, {}, {}
    for strategy in ("data", "fsdp"):
        config = tiny_config("rsd", teacher_checkpoint=teacher_dir, steps=3)
        config.sharding = config.teacher_sharding = strategy
        setup, teacher_variables = step.build(config, 10, 3, 3, mesh)
        state = step.init_state(setup, 0)
        train_step = step.jit_train_step(setup)
        losses[strategy] = []
        for batch in batches:
            state, metrics = train_step(state, teacher_variables,
                                        sharding.global_batch(batch, mesh))
            losses[strategy].append(float(metrics["train/loss"]))
        states[strategy], trainers[strategy] = state, (setup, teacher_variables, config)
    np.testing.assert_allclose(losses["fsdp"], losses["data"], rtol=1e-6)
    fsdp, data = states["fsdp"], states["data"]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         rtol=1e-5, atol=1e-6),
                 fsdp.params, data.params)

    # FSDP really splits the state: the qkv kernel [32, 96] is split along its 96 outputs,
    # and each device holds a fraction of the parameters and optimiser state.
    qkv = fsdp.params["student"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == P(None, "data")
    assert qkv.addressable_shards[0].data.shape == (32, 12)
    sharded_part = (_per_device_bytes((fsdp.params, fsdp.opt_state)) /
                    _per_device_bytes((data.params, data.opt_state)))
    assert sharded_part < 0.25, sharded_part
    assert _per_device_bytes(trainers["fsdp"][1]) < 0.25 * _per_device_bytes(
        trainers["data"][1])

    # The evaluation step takes the sharded parameters as they are.
    eval_batch = {**batches[0], "mask": np.ones(16, np.float32)}
    counts = {s: jax.jit(functools.partial(step.eval_step, trainers[s][0]))(
        states[s].params["student"], states[s].model_state["student"],
        sharding.global_batch(eval_batch, mesh)) for s in ("data", "fsdp")}
    assert float(counts["fsdp"]["top1"]) == float(counts["data"]["top1"])

    # Checkpoints round-trip onto the FSDP shardings, and a data-parallel checkpoint resumes
    # as FSDP (the strategy may change between runs).
    meta = run_config.run_metadata(trainers["fsdp"][2])
    for strategy in ("fsdp", "data"):
        ckpt = checkpoint.TrainCheckpointer(str(tmp_path / strategy))
        ckpt.save(3, states[strategy], meta)
        restored = ckpt.restore(3, step.abstract_state(trainers["fsdp"][0]), meta)
        ckpt.close()
        _assert_trees_equal(restored, states[strategy])
        jax.tree.map(lambda x, y: np.testing.assert_equal(x.sharding, y.sharding),
                     restored, fsdp)
    # The gathered copy (what the export writes) is the whole array.
    np.testing.assert_array_equal(sharding.to_host(qkv, mesh), np.asarray(qkv))


def test_distributed_settings_from_config_then_environment():
    config = recipes.base_config()
    assert sharding.distributed_settings(config, environ={}) is None
    env = {"JAXKD_COORDINATOR": "10.0.0.1:1234", "JAXKD_NUM_PROCESSES": "4",
           "JAXKD_PROCESS_ID": "3"}
    assert sharding.distributed_settings(config, environ=env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    config.distributed.update(coordinator_address="127.0.0.1:99", process_id=0)
    assert sharding.distributed_settings(config, environ=env) == {
        "coordinator_address": "127.0.0.1:99", "num_processes": 4, "process_id": 0}
    with pytest.raises(ConfigError, match="num_processes"):
        sharding.distributed_settings(config, environ={})
    config.distributed.update(num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match="not below num_processes"):
        sharding.distributed_settings(config, environ={})
    assert sharding.distributed_settings(recipes.base_config(),
                                         environ={"JAXKD_DISTRIBUTED_AUTO": "1"}) == {}
