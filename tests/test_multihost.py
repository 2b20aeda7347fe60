"""Two processes on 127.0.0.1 (2 fake CPU devices each, FSDP state) through
`python -m jaxkd.main` take the same steps as one process with the same 4-device mesh and the
same global batches, and write one set of metrics, a complete checkpoint and the export."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from jaxkd import checkpoint, data, sharding, step
from jaxkd import run_config as run_checks
from jaxkd.metric_writer import read_metrics

from helpers import random_teacher, tiny_config

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
STEPS = 3
TIMEOUT_S = 300

CONFIG_FILE = """
import test_multihost

def get_config(arg=None):
    config = test_multihost.run_config({data_dir!r}, {teacher!r})
    config.sharding = "fsdp"
    return config
"""


def run_config(data_dir, teacher):
    config = tiny_config("kd", data_dir=data_dir, teacher_checkpoint=teacher, steps=STEPS)
    # SGD: Adam's first steps turn reduction-order noise in near-zero gradients into whole
    # learning-rate-sized differences, which would hide what the parameters are compared for.
    config.optimizer.update(name="sgd", lr=0.05)
    config.eval_batch_size = 120
    return config


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config_path, workdir, port, process_id, log_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
           "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3",
           # conftest's persistent compilation cache, so that repeated runs compile less
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
           "PYTHONPATH": os.pathsep.join([TESTS_DIR, REPO_DIR])}
    log = open(os.path.join(log_dir, f"process{process_id}.log"), "w")
    command = [sys.executable, "-m", "jaxkd.main", f"--config={config_path}",
               f"--workdir={workdir}",
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               "--config.distributed.num_processes=2",
               f"--config.distributed.process_id={process_id}"]
    return subprocess.Popen(command, cwd=REPO_DIR, env=env, stdout=log,
                            stderr=subprocess.STDOUT), log


def _assert_close_to_scale(actual, expected):
    """Equal up to float32 reduction-order noise, measured against the array's own scale
    (element-wise relative errors of near-zero entries are noise)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-12)
    assert float(np.max(np.abs(actual - expected), initial=0.0)) <= 1e-4 * scale


def _reference_run(config, mesh):
    """The same run in this process: global batch k = process 0's batch k, then process 1's."""
    ds = config.dataset
    dataset = data.open_dataset(ds.name, ds.data_dir)
    info = dataset.info
    steps_per_epoch, total_steps = run_checks.resolve_durations(config,
                                                                info.num_train_examples)
    setup, teacher_variables = step.build(config, info.num_classes, steps_per_epoch,
                                          total_steps, mesh)
    train_step = step.jit_train_step(setup)
    sampler = data.RandomSampler(data.TrainData.from_config(config))
    streams = [sampler.batches(dataset, process_index=i, process_count=2,
                               local_device_count=mesh.size // 2) for i in range(2)]
    state, losses = step.init_state(setup, config.seed), []
    for _ in range(STEPS):
        parts = [next(stream) for stream in streams]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        state, metrics = train_step(state, teacher_variables,
                                    sharding.global_batch(batch, mesh))
        losses.append(float(metrics["train/loss"]))
    return setup, state, losses


def test_two_processes_match_one_process(tmp_path):
    data_dir = str(tmp_path / "tfds")
    data.prepare("sklearn_digits", data_dir)  # once, before both processes read it
    teacher = random_teacher(str(tmp_path / "teacher"), num_classes=10)
    config_path = tmp_path / "multihost_config.py"
    config_path.write_text(CONFIG_FILE.format(data_dir=data_dir, teacher=teacher))
    workdir = str(tmp_path / "run")
    port = _free_port()
    launched = [_launch(str(config_path), workdir, port, i, str(tmp_path)) for i in range(2)]
    try:
        # Computed while the two processes run.
        config = run_config(data_dir, teacher)
        mesh = sharding.data_mesh(jax.devices()[:4])
        setup, reference, reference_losses = _reference_run(config, mesh)
        codes = [process.wait(timeout=TIMEOUT_S) for process, _ in launched]
    finally:
        for process, log in launched:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    logs = [(tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2)]
    assert codes == [0, 0], "\n\n".join(logs)

    metrics = read_metrics(workdir)
    steps = [m["step"] for m in metrics if "train/loss" in m]
    assert steps == list(range(1, STEPS + 1))  # one writer: each step logged once
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)

    # The checkpoint both processes wrote (FSDP: each its own shards) restores in full.
    ckpt = checkpoint.TrainCheckpointer(workdir)
    assert ckpt.latest_step() == STEPS
    restored = ckpt.restore(STEPS, step.abstract_state(setup), run_checks.run_metadata(config))
    ckpt.close()
    jax.tree.map(_assert_close_to_scale, restored.params, reference.params)
    jax.tree.map(_assert_close_to_scale, restored.opt_state, reference.opt_state)
    # Process 0's export holds the gathered student.
    exported, meta = checkpoint.load_model(os.path.join(workdir, "export"))
    jax.tree.map(_assert_close_to_scale, exported["params"], reference.params["student"])
    assert meta["model_name"] == config.student.name
