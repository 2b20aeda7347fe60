"""Input pipelines: the digits TFDS builder, train/eval batches, train labels, augmentation,
fail-fast, no JAX."""

import collections
import concurrent.futures
import fcntl
import itertools
import math
import os
import random
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxkd import data
from jaxkd.data import augment as augment_lib
from jaxkd.data import datasets, pipeline
from jaxkd.errors import ConfigError

from conftest import MOCK_CIFAR_EXAMPLES
from helpers import sampler_batches

DIGITS = "sklearn_digits"


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """Digits stored in 3 files, so example indices must combine shard offsets."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder(DIGITS, data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=3))
    return data_dir


@pytest.fixture(scope="module")
def digits_splits(digits_dir):
    """The stored splits read file after file, so that the position of an example is its index
    in the split (as TFDS slicing counts): {split: (images, labels)}."""
    builder = tfds.builder(DIGITS, data_dir=digits_dir)
    assert builder.info.splits["train"].num_shards == 3
    one_file_at_a_time = tfds.ReadConfig(interleave_cycle_length=1)
    return {split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                     as_supervised=True,
                                                     read_config=one_file_at_a_time))
            for split in ("train", "test")}


def take(iterator, count):
    return list(itertools.islice(iterator, count))


def assert_batches_equal(batches, expected):
    assert len(batches) == len(expected)
    for batch, expected_batch in zip(batches, expected):
        assert batch.keys() == expected_batch.keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], expected_batch[key])


def digits_train(digits_dir, **kwargs):
    kwargs = {"global_batch_size": 64, "image_size": 8, "seed": 0, "augment": None} | kwargs
    return sampler_batches(DIGITS, digits_dir, **kwargs)


def test_digits_builder_prepares_offline_with_documented_split(tmp_path):
    from sklearn.datasets import load_digits

    builder = data.prepare(DIGITS, str(tmp_path))
    assert builder.is_prepared() and str(builder.version) == "1.0.0"
    assert tfds.builder(DIGITS, data_dir=str(tmp_path)).is_prepared()
    assert builder.info.features["image"].shape == (8, 8, 1)
    assert builder.info.features["label"].num_classes == 10
    reference = load_digits()
    reference_images = np.round(reference.images * 255 / 16).astype(np.uint8)
    assert len(reference_images) == 1797
    stored = collections.Counter()
    for split, expected_size in (("train", 1437), ("test", 360)):
        images, labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                          as_supervised=True))
        assert images.shape == (expected_size, 8, 8, 1) and images.dtype == np.uint8
        assert builder.info.splits[split].num_examples == expected_size
        # Stratified: each class holds its share of the split, to within one example.
        expected_counts = np.bincount(reference.target, minlength=10) * expected_size / 1797
        assert np.all(np.abs(np.bincount(labels, minlength=10) - expected_counts) <= 1)
        assert np.all(images.reshape(len(images), -1).std(axis=1) > 0)
        stored.update((image.tobytes(), label) for image, label in zip(images[..., 0], labels))
    # Train and test together are exactly scikit-learn's digits, each image with its label.
    assert stored == collections.Counter(
        (image.tobytes(), label) for image, label in zip(reference_images, reference.target))


def test_digits_preparation_waits_for_another_process(tmp_path):
    """A second local process must wait for the first one's preparation, not redo it (TFDS
    would fail renaming its copy onto the finished one)."""
    with open(datasets.prepare_lock_path(DIGITS, tmp_path), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # As the other process does while preparing.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
            waiting = executor.submit(data.prepare, DIGITS, str(tmp_path))
            time.sleep(1.0)
            assert not waiting.done()
            tfds.builder(DIGITS, data_dir=str(tmp_path)).download_and_prepare()
            fcntl.flock(lock, fcntl.LOCK_UN)
            builder = waiting.result(timeout=60)
    assert builder.is_prepared() and builder.info.splits["train"].num_examples == 1437


def test_dataset_info_and_train_fraction(digits_dir):
    assert data.open_dataset(DIGITS, digits_dir).info == data.DatasetInfo(
        num_classes=10, num_train_examples=1437, num_eval_examples=360, train_split="train",
        eval_split="test")
    info = data.open_dataset(DIGITS, digits_dir, train_fraction=0.25).info
    assert info.num_train_examples == round(0.25 * 1437)
    assert info.train_split == f"train[:{info.num_train_examples}]"
    batches = take(digits_train(digits_dir, train_fraction=0.25, global_batch_size=32), 20)
    indices = np.concatenate([batch["index"] for batch in batches])
    assert indices.max() < info.num_train_examples
    assert len(set(indices[:32 * 11])) == 32 * 11  # An epoch (11 steps) has no repeats.


def test_train_batches_digits_content_and_epochs(digits_dir, digits_splits):
    """Without augmentation at native size, each row is the stored example at its index."""
    images, labels = digits_splits["train"]
    steps_per_epoch = 1437 // 64
    batches = take(digits_train(digits_dir), steps_per_epoch + 2)
    for batch in batches:
        assert batch["image"].shape == (64, 8, 8, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
        assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
        np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
        expected = np.repeat(images[batch["index"]], 3, axis=-1) / 255.0
        np.testing.assert_allclose(batch["image"], expected, atol=1e-6)
    epoch = np.concatenate([batch["index"] for batch in batches[:steps_per_epoch]])
    assert len(set(epoch)) == len(epoch)  # A permutation, less the dropped remainder.
    next_epoch = np.concatenate([batch["index"] for batch in batches[steps_per_epoch:]])
    assert not np.array_equal(next_epoch, epoch[:len(next_epoch)])  # Reshuffled.


def test_train_batches_deterministic_and_resumable(digits_dir):
    """A run restarted at step k gives batches k, k+1 of a fresh run with the same seed (which
    is also the determinism check: two independently built pipelines agree)."""
    config = {"global_batch_size": 64, "image_size": 16, "augment": {}}
    steps_per_epoch = 1437 // 64
    fresh = take(digits_train(digits_dir, seed=3, **config), steps_per_epoch + 3)
    other_seed = next(digits_train(digits_dir, seed=4, **config))
    assert not np.array_equal(other_seed["index"], fresh[0]["index"])
    for start_step in (5, steps_per_epoch + 1):  # Inside the first epoch and in the next.
        resumed = take(digits_train(digits_dir, seed=3, start_step=start_step, **config), 2)
        assert_batches_equal(resumed, fresh[start_step:start_step + 2])


def test_tiny_split_runs_several_reshuffled_epochs_per_pipeline(digits_dir):
    """359 examples (a quarter of the digits) are below MIN_EXAMPLES_PER_PIPELINE: each run of
    359 consecutive examples is one epoch, a new permutation, augmented anew."""
    config = {"train_fraction": 0.25, "global_batch_size": 32, "image_size": 16,
              "augment": {}, "seed": 1}
    assert 359 < pipeline.MIN_EXAMPLES_PER_PIPELINE
    batches = take(digits_train(digits_dir, **config), 45)
    indices = np.concatenate([batch["index"] for batch in batches])
    images = np.concatenate([batch["image"] for batch in batches])
    epochs = [indices[i * 359:(i + 1) * 359] for i in range(4)]
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(359))
    assert not np.array_equal(epochs[0], epochs[1])
    first, second = (np.flatnonzero(epoch == 7)[0] for epoch in epochs[:2])
    assert not np.array_equal(images[first], images[359 + second])  # a new crop and flip
    # Resuming inside the second epoch of the pipeline gives the same batches.
    assert_batches_equal(take(digits_train(digits_dir, start_step=13, **config), 2),
                         batches[13:15])


def test_batch_transform_hook_is_applied_and_resumes(digits_dir, monkeypatch):
    def tag_with_seed(batch, seed):
        return {**batch, "hook_seed": seed}

    monkeypatch.setattr(augment_lib, "batch_transforms",
                        lambda config, **devices: [tag_with_seed])
    fresh = take(digits_train(digits_dir, augment={}), 3)
    seeds = [tuple(batch["hook_seed"]) for batch in fresh]
    assert len(set(seeds)) == 3
    assert_batches_equal(take(digits_train(digits_dir, augment={}, start_step=1), 2), fresh[1:])


def test_train_batches_two_processes_read_disjoint_halves(digits_dir):
    half = 1437 // 2
    steps_per_epoch = half // 32
    per_process = []
    for process_index in range(2):
        batches = take(digits_train(digits_dir, process_index=process_index, process_count=2),
                       steps_per_epoch)
        assert all(batch["image"].shape[0] == 32 for batch in batches)
        indices = np.concatenate([batch["index"] for batch in batches])
        assert len(set(indices)) == len(indices)
        assert indices.min() >= process_index * half
        assert indices.max() < (process_index + 1) * half
        per_process.append(set(indices))
    assert not per_process[0] & per_process[1]


def test_train_labels_are_the_labels_of_batch_indices(digits_dir, digits_splits):
    """One array over the whole train split (all processes' shares), in index order, read
    once; with a train fraction, its first examples."""
    _, stored_labels = digits_splits["train"]
    dataset = data.open_dataset(DIGITS, digits_dir)
    labels = dataset.train_labels()
    assert labels.dtype == np.int32 and not labels.flags.writeable
    np.testing.assert_array_equal(labels, stored_labels)
    assert dataset.train_labels() is labels  # cached
    for process_index in range(2):
        for batch in take(digits_train(digits_dir, process_index=process_index,
                                       process_count=2), 3):
            np.testing.assert_array_equal(labels[batch["index"]], batch["label"])
    quarter = data.open_dataset(DIGITS, digits_dir, train_fraction=0.25).train_labels()
    np.testing.assert_array_equal(quarter, stored_labels[:359])


def test_make_sampler_reads_the_run_config(tmp_path):
    from jaxkd import recipes
    from jaxkd.data import neighbours

    config = recipes.base_config()
    config.dataset.update(image_size=32, index_size=12, num_neighbours=3, neighbour_pool=5)
    config.augment.scale_min = 0.35
    train_data = data.TrainData(global_batch_size=128, image_size=32, seed=0,
                                augment=data.AugmentConfig(scale_min=0.35))
    assert data.make_sampler(config, str(tmp_path), "random") == data.RandomSampler(train_data)
    assert data.make_sampler(config, str(tmp_path), "neighbours") == data.NeighbourSampler(
        train_data, index_path=neighbours.index_path(str(tmp_path), 12), index_size=12,
        num_neighbours=3, neighbour_pool=5)
    with pytest.raises(ConfigError, match="dataset.sampler must be one of .* 'nearest'"):
        data.make_sampler(config, str(tmp_path), "nearest")


def test_data_package_does_not_import_jax():
    """No module of jaxkd.data imports JAX (checked in the source, and by importing the package
    where JAX cannot be imported: TensorFlow itself imports JAX when it can, optionally)."""
    import ast
    import pathlib

    package = pathlib.Path(data.__file__).parent
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.split(".")[0] in ("jax", "flax", "optax") for name in names), (
                f"{module.name} imports {names}")
    code = """
import importlib.abc, sys
class NoJax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "jax":
            raise ImportError("jax is blocked")
sys.meta_path.insert(0, NoJax())
import jaxkd.data
assert "jax" not in sys.modules
print("imported", len(jaxkd.data.__all__))
"""
    repo = str(package.parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=repo, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "imported" in result.stdout


def test_eval_batches_digits_cover_each_example_once(digits_dir, digits_splits):
    images, labels = digits_splits["test"]
    batches = list(data.open_dataset(DIGITS, digits_dir).eval_batches(global_batch_size=64,
                                                                      image_size=8))
    assert len(batches) == math.ceil(360 / 64)
    mask = np.concatenate([batch["mask"] for batch in batches])
    assert mask.dtype == np.float32 and mask.sum() == 360 and set(mask) == {0.0, 1.0}
    last = batches[-1]
    assert np.all(last["mask"][:360 % 64] == 1) and np.all(last["mask"][360 % 64:] == 0)
    assert np.all(last["image"][360 % 64:] == 0)
    valid = np.concatenate([batch["index"][batch["mask"] == 1] for batch in batches])
    np.testing.assert_array_equal(np.sort(valid), np.arange(360))
    for batch in batches:
        rows = batch["mask"] == 1
        np.testing.assert_array_equal(batch["label"][rows], labels[batch["index"][rows]])
        np.testing.assert_allclose(batch["image"][rows],
                                   np.repeat(images[batch["index"][rows]], 3, -1) / 255.0,
                                   atol=1e-6)


def test_eval_batches_uneven_processes_yield_equal_batch_counts(digits_dir):
    """360 over 7 processes: shares of 52 and 51; with 51 per batch all yield 2 batches."""
    valid, dataset = [], data.open_dataset(DIGITS, digits_dir)
    for process_index in range(7):
        batches = list(dataset.eval_batches(global_batch_size=7 * 51, image_size=8,
                                            process_index=process_index, process_count=7))
        assert len(batches) == 2
        assert all(batch["image"].shape == (51, 8, 8, 3) for batch in batches)
        valid.extend(np.concatenate([batch["index"][batch["mask"] == 1] for batch in batches]))
    np.testing.assert_array_equal(np.sort(valid), np.arange(360))


def test_mock_cifar100_train_and_eval(mock_cifar):
    dataset = data.open_dataset("cifar100", mock_cifar)
    info = dataset.info
    assert (info.num_classes, info.num_train_examples, info.eval_split) == (
        100, MOCK_CIFAR_EXAMPLES, "test")

    def train(**kwargs):
        kwargs = {"global_batch_size": 16, "image_size": 40, "seed": 0, "augment": {}} | kwargs
        return sampler_batches("cifar100", mock_cifar, **kwargs)

    batches = take(train(), 5)  # 3 steps per epoch: crosses an epoch boundary.
    for batch in batches:
        assert batch["image"].shape == (16, 40, 40, 3) and batch["image"].dtype == np.float32
        assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
        assert batch["label"].min() >= 0 and batch["label"].max() < 100
        assert batch["index"].min() >= 0 and batch["index"].max() < MOCK_CIFAR_EXAMPLES
    assert_batches_equal(take(train(start_step=4), 1), batches[4:])  # Also determinism.
    assert not np.array_equal(next(train(seed=1))["index"], batches[0]["index"])
    labels = dataset.train_labels()
    assert labels.shape == (MOCK_CIFAR_EXAMPLES,) and labels.dtype == np.int32
    for batch in batches:
        np.testing.assert_array_equal(labels[batch["index"]], batch["label"])

    evaluated = list(dataset.eval_batches(global_batch_size=20, image_size=32))
    assert [batch["mask"].sum() for batch in evaluated] == [20, 20, 8]
    valid = np.concatenate([batch["index"][batch["mask"] == 1] for batch in evaluated])
    np.testing.assert_array_equal(np.sort(valid), np.arange(MOCK_CIFAR_EXAMPLES))


def test_augmentation_changes_images_within_range(digits_dir):
    plain = next(digits_train(digits_dir, image_size=16))
    augmented = next(digits_train(digits_dir, image_size=16, augment={}))
    np.testing.assert_array_equal(plain["index"], augmented["index"])  # Same shuffle.
    assert augmented["image"].min() >= 0.0 and augmented["image"].max() <= 1.0
    changed = np.abs(augmented["image"] - plain["image"]).max(axis=(1, 2, 3)) > 1e-3
    assert changed.mean() > 0.9
    # Flip only: every image is the plain one or its mirror, and both occur.
    flip_config = ml_collections.ConfigDict({"random_resized_crop": False, "flip": True})
    flipped = next(digits_train(digits_dir, image_size=16, augment=flip_config))
    same = np.all(flipped["image"] == plain["image"], axis=(1, 2, 3))
    mirrored = np.all(flipped["image"] == plain["image"][:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored) and same.any() and (mirrored & ~same).any()


def test_augment_config_parsing():
    assert augment_lib.AugmentConfig.from_config({}) == augment_lib.AugmentConfig(
        random_resized_crop=True, scale_min=0.08, flip=True)
    config = ml_collections.ConfigDict({"scale_min": 0.35, "flip": False})
    assert augment_lib.AugmentConfig.from_config(config).scale_min == 0.35
    with pytest.raises(ValueError, match="scale_mni"):
        augment_lib.AugmentConfig.from_config({"scale_mni": 0.35})


def test_padded_random_crop_is_torchvision_random_crop_with_padding():
    """RandomCrop(32, padding=4): a 32 x 32 window of the zero-padded 40 x 40 image, every
    one of the 9 x 9 offsets about equally often."""
    image = np.random.RandomState(0).rand(32, 32, 3).astype(np.float32) + 0.5  # no zeros
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    crop = tf.function(lambda seed: augment_lib.padded_random_crop(
        tf.constant(image), seed, image_size=32, padding=4))
    draws = 1620
    counts = np.zeros((9, 9), int)
    for i in range(draws):
        out = crop(tf.constant([3, i], tf.int64)).numpy()
        offsets = [(t, l) for t in range(9) for l in range(9)
                   if np.array_equal(out, padded[t:t + 32, l:l + 32])]
        assert len(offsets) == 1, "not a window of the padded image"
        counts[offsets[0]] += 1
    assert counts.min() > 0  # every offset occurs ...
    assert scipy.stats.chisquare(counts.ravel()).pvalue > 1e-3  # ... about equally often
    with pytest.raises(ValueError, match="crop_padding"):
        augment_lib.AugmentConfig(crop_padding=4)  # random_resized_crop is on by default
    with pytest.raises(ValueError, match="crop_padding"):
        augment_lib.AugmentConfig(random_resized_crop=False, crop_padding=-1)


def crop_windows(height, width, count):
    seeds = tf.stack([tf.fill([count], tf.constant(7, tf.int64)),
                      tf.range(count, dtype=tf.int64)], axis=1)
    windows = tf.function(lambda seeds: tf.map_fn(
        lambda seed: augment_lib.random_resized_crop_window(height, width, seed,
                                                            scale=(0.08, 1.0)),
        seeds, fn_output_signature=tf.int32))
    return windows(seeds).numpy()


def timm_module():
    from jaxkd.convert.timm_import import import_timm

    import_timm()
    import torch
    from timm.data.transforms import RandomResizedCropAndInterpolation

    return torch, RandomResizedCropAndInterpolation


def test_random_resized_crop_window_matches_timm():
    torch, timm_crop = timm_module()
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    # No attempt can fit these thin images: both fall back to the same central crop.
    for height, width in ((100, 1), (3, 90)):
        expected = timm_crop.get_params(torch.zeros(3, height, width), scale, ratio)
        np.testing.assert_array_equal(crop_windows(height, width, 3), [expected] * 3)
    # Same distribution on a real-size image: windows inside, moments close to timm's.
    ours = crop_windows(40, 56, 3000).astype(np.float64)
    random.seed(0)  # timm draws from Python's global generator.
    theirs = np.array([timm_crop.get_params(torch.zeros(3, 40, 56), scale, ratio)
                       for _ in range(3000)], np.float64)
    for windows in (ours, theirs):
        top, left, crop_height, crop_width = windows.T
        assert np.all((top >= 0) & (left >= 0) & (crop_height >= 1) & (crop_width >= 1))
        assert np.all((top + crop_height <= 40) & (left + crop_width <= 56))
    for statistic in (lambda w: w[:, 2] * w[:, 3] / (40 * 56), lambda w: np.log(w[:, 3] / w[:, 2]),
                      lambda w: w[:, 0] / 40, lambda w: w[:, 1] / 56):
        ours_stat, theirs_stat = statistic(ours), statistic(theirs)
        standard_error = math.hypot(ours_stat.std() / math.sqrt(len(ours)),
                                    theirs_stat.std() / math.sqrt(len(theirs)))
        assert abs(ours_stat.mean() - theirs_stat.mean()) < 4 * standard_error


def test_eval_resize_matches_torchvision():
    torch, _ = timm_module()
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tv_functional

    image = np.random.default_rng(0).random((37, 53, 3), dtype=np.float32)
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    for size, view in ((24, augment_lib.EvalView(0.875)), (32, augment_lib.EvalView(0.9))):
        ours = augment_lib.resize_short_side_center_crop(tf.constant(image), size, view).numpy()
        resized = tv_functional.resize(tensor, math.floor(size / view.crop_pct),
                                       interpolation=InterpolationMode.BILINEAR, antialias=True)
        theirs = tv_functional.center_crop(resized, [size, size]).permute(1, 2, 0).numpy()
        assert ours.shape == (size, size, 3)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    for size in (64, 16):  # up and down
        plain = augment_lib.resize(tf.constant(image), size).numpy()
        theirs_plain = tv_functional.resize(tensor, [size, size], antialias=True,
                                            interpolation=InterpolationMode.BILINEAR)
        np.testing.assert_allclose(plain, theirs_plain.permute(1, 2, 0).numpy(), atol=1e-5)


@pytest.mark.parametrize("interpolation,mean_tolerance,max_tolerance",
                         [("bilinear", 0.5, 1.5), ("bicubic", 0.5, 10.0)])
def test_eval_view_of_a_photo_matches_pil(interpolation, mean_tolerance, max_tolerance):
    """timm's eval transform runs PIL on uint8 images: Resize(floor(224 / crop_pct)) of the
    short side, CenterCrop(224). On a real photo (scikit-learn's 427 x 640 china.jpg) ours
    stays within PIL's uint8 rounding on average (tolerances in 1/255)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")
    view = augment_lib.EvalView(0.9, interpolation)
    ours = augment_lib.resize_short_side_center_crop(
        tf.constant(photo, tf.float32) / 255.0, 224, view).numpy()
    scale = math.floor(224 / view.crop_pct)
    height, width = photo.shape[:2]
    new_size = (int(scale * width / height), scale)  # PIL: (width, height); height is short
    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    resized = np.asarray(Image.fromarray(photo).resize(new_size, method), np.float32) / 255.0
    top, left = (round((n - 224) / 2.0) for n in resized.shape[:2])
    theirs = resized[top:top + 224, left:left + 224]
    difference = np.abs(ours - theirs) * 255.0
    assert ours.min() >= 0.0 and ours.max() <= 1.0
    assert difference.mean() < mean_tolerance and difference.max() < max_tolerance
    with pytest.raises(ValueError, match="interpolation"):
        augment_lib.EvalView(0.9, "lanczos")


def test_unprepared_dataset_fails_fast_with_instructions(tmp_path):
    for name, needed in (("cifar100", "cifar-100-binary.tar.gz"),
                         ("imagenet2012", "ILSVRC2012_img_train.tar")):
        start = time.monotonic()
        with pytest.raises(data.DatasetNotAvailableError) as error:
            data.open_dataset(name, str(tmp_path))
        assert time.monotonic() - start < 10.0  # TFDS's download retries take minutes.
        message = str(error.value)
        for part in (repr(name), str(tmp_path), needed, f"{tmp_path}/downloads/manual",
                     f"tfds build {name} --data_dir {tmp_path}"):
            assert part in message


def test_unknown_dataset_lists_supported():
    with pytest.raises(ValueError) as error:
        data.prepare("mnist")
    for name in ("'mnist'", "sklearn_digits", "cifar100", "imagenet2012"):
        assert name in str(error.value)
