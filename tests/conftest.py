"""Test setup: 8 fake CPU devices and float32-exact matmuls, set before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_platforms", "cpu")

# Many tests compile the same small programs: a persistent cache makes the repeats cheap.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAXKD_TEST_COMPILE_CACHE", "/tmp/jaxkd-test-compile-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


MOCK_CIFAR_EXAMPLES = 48


@pytest.fixture
def mock_cifar(tmp_path):
    """tfds.testing.mock_data for cifar100, with metadata saying each split has 48 examples
    (the installed TFDS ships no metadata for the mock). Yields a data_dir to pass along."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("cifar100", data_dir=str(tmp_path))
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[MOCK_CIFAR_EXAMPLES], num_bytes=0)
        for split in ("train", "test")]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    with tfds.testing.mock_data(num_examples=MOCK_CIFAR_EXAMPLES, data_dir=str(tmp_path)):
        yield str(tmp_path / "ignored_by_the_mock")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """A TFDS data dir where the digits prepare themselves on first use (files that need
    them prepared another way define their own)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Random 10-class digits teachers: a tiny DeiT ('vit') and ResNet18 ('cnn')."""
    from helpers import random_teachers

    return random_teachers(tmp_path_factory.mktemp("teachers"))
