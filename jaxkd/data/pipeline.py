"""The random sampler: shuffled, augmented train batches from a tf.data pipeline.

Training data is split evenly over processes, shuffled per epoch with seeds derived from
(seed, epoch), repeated forever and resumable at any step: batch k is a function of (seed, k).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxkd.data import augment as augment_lib
from jaxkd.data.datasets import Dataset, local_batch_size, traced
from jaxkd.errors import ConfigError

if TYPE_CHECKING:
    from jaxkd.data.sampling import TrainData

# Examples are buffered encoded: all of CIFAR's train split is ~150 MB, 50k ImageNet images
# ~5.5 GB (twice that during the second half of an epoch, while the next one is started).
DEFAULT_SHUFFLE_BUFFER = 50_000
# A tiny split (the digits: a few hundred examples) is read as several passes per pipeline,
# each reshuffled, so that building a pipeline (~1 s) is not paid every few steps.
MIN_EXAMPLES_PER_PIPELINE = 8192


def _epoch_seeds(seed: int, epoch: int) -> tuple[int, tf.Tensor, tf.Tensor]:
    """(shuffle seed, per-example augmentation seed, per-batch seed) of one epoch."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(5).astype(np.int64)
    return int(state[0]), tf.constant(state[1:3]), tf.constant(state[3:5])


@dataclasses.dataclass(frozen=True)
class RandomSampler:
    """Shuffled, augmented batches of `data`; `data.augment=None` means a plain resize."""

    data: TrainData
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER

    def prepare(self, dataset: Dataset, *, embed_fn: Callable | None, batch_size: int,
                process_count: int = 1) -> None:
        """Nothing to prepare: the batches read the dataset alone."""
        del dataset, embed_fn, batch_size, process_count

    def batches(self, dataset: Dataset, *, start_step: int = 0, process_index: int = 0,
                process_count: int = 1, local_device_count: int = 1
                ) -> Iterator[dict[str, np.ndarray]]:
        """Endless train batches {"image", "label", "index"} of global_batch_size //
        process_count.

        Each process reads its even share of the train split (equal sizes, remainder dropped);
        each epoch reshuffles it with seeds from (seed, epoch) and drops the last partial
        batch, so batch k is a function of (seed, k) alone and `start_step=k` starts there,
        skipping only within the epoch. A split smaller than MIN_EXAMPLES_PER_PIPELINE is read
        as several epochs per pipeline (each reshuffled, partial batches carried into the next
        epoch). "label" is int32 [B], or float32 [B, num_classes] soft targets when the
        augmentation mixes images (mixup/cutmix; by default per device, each of the process's
        `local_device_count` equal chunks on its own).
        """
        data, info = self.data, dataset.info
        local_batch = local_batch_size(data.global_batch_size, process_count)
        config = data.augment
        mixes = config is not None and config.mixes  # Mixing makes soft targets.
        if mixes and config.mix_per_device and local_batch % local_device_count:
            raise ConfigError(f"mixup/cutmix per device: the per-process batch {local_batch} "
                              f"does not split over {local_device_count} devices")
        local_split = tfds.even_splits(info.train_split, n=process_count,
                                       drop_remainder=True)[process_index]
        example_transforms = augment_lib.example_transforms(config, data.image_size)
        batch_transforms = augment_lib.batch_transforms(
            config, local_device_count=local_device_count, process_index=process_index)
        decode = dataset.decoder("train")
        seed = data.seed

        num_local = dataset.builder.info.splits[local_split].num_examples
        if num_local < local_batch:
            raise ValueError(f"{dataset.name}: {num_local} train examples in this process, "
                             f"fewer than one batch of {local_batch}")
        # One pipeline serves `passes` epochs of the split, each a new permutation; batches run
        # on across passes and only the last pass drops its partial batch.
        passes = max(1, math.ceil(MIN_EXAMPLES_PER_PIPELINE / num_local))
        steps_per_pipeline = num_local * passes // local_batch

        def epoch_batches(epoch: int, skip_steps: int) -> tf.data.Dataset:
            shuffle_seed, example_seed, batch_seed = _epoch_seeds(seed, epoch)

            def preprocess(position, example):
                image, label, index = decode(example)
                example_key = tf.random.experimental.stateless_fold_in(example_seed, index)
                if passes > 1:  # each pass augments an example anew
                    example_key = tf.random.experimental.stateless_fold_in(
                        example_key, position // num_local)
                image = augment_lib.apply_example_transforms(image, example_key,
                                                             example_transforms)
                if mixes:
                    label = tf.one_hot(label, info.num_classes)
                return {"image": image, "label": label, "index": index}

            def apply_batch_transforms(step, batch):
                return augment_lib.apply_batch_transforms(
                    batch, tf.random.experimental.stateless_fold_in(batch_seed, step),
                    batch_transforms)

            ds = dataset.read(local_split, shuffle_seed=shuffle_seed)
            ds = ds.shuffle(min(num_local, self.shuffle_buffer_size), seed=shuffle_seed,
                            reshuffle_each_iteration=True).repeat(passes)
            ds = ds.enumerate().skip(skip_steps * local_batch)
            ds = ds.map(traced(preprocess), num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.batch(local_batch, drop_remainder=True)
            if batch_transforms:
                ds = ds.enumerate(start=skip_steps).map(traced(apply_batch_transforms),
                                                        num_parallel_calls=tf.data.AUTOTUNE)
            return ds.prefetch(tf.data.AUTOTUNE)

        def started_epoch(epoch: int, skip_steps: int):
            """Builds an epoch's pipeline and takes its first batch (this fills the buffer)."""
            rest = epoch_batches(epoch, skip_steps).as_numpy_iterator()
            return next(rest), rest

        def batches():
            # Half-way through a pipeline the next one is started in a thread: building it and
            # filling its shuffle buffer would otherwise stall every pipeline start.
            epoch, skip_steps = divmod(start_step, steps_per_pipeline)
            executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            upcoming = executor.submit(started_epoch, epoch, skip_steps)
            try:
                while True:
                    first, rest = upcoming.result()
                    yield first
                    for _ in range((steps_per_pipeline - skip_steps) // 2):
                        yield next(rest)
                    epoch, skip_steps = epoch + 1, 0
                    upcoming = executor.submit(started_epoch, epoch, skip_steps)
                    yield from rest
            finally:  # A closed iterator does not wait for an epoch being started.
                executor.shutdown(wait=False, cancel_futures=True)

        return batches()
