"""CoSS's nearest-neighbour batches: an offline teacher-embedding index and the batch sampler.

Preparation (`prepare_index`, run by the trainer before any batch is read): the teacher embeds
the centre-cropped (eval-transform) train split and each example gets its top-`index_size`
cosine neighbours, self excluded (`top_k_neighbours`, chunked matmuls); the index is saved as
.npy in the run's workdir and reused when present.

Online, `NeighbourSampler.batches` yields the same batch dicts as the random sampler
({"image", "label", "index"}): each batch is `anchors` groups of `1 + num_neighbours`
consecutive examples, an anchor followed by neighbours drawn without replacement from its
top `neighbour_pool` (CoSS: 16 anchors x (1 + 15) images per device, pool 31). Anchors run
through a fresh permutation of the train split each pass. An "epoch" of the trainer stays
num_train_examples images. Batch k is a function of (seed, k), so runs resume exactly.

The train split's encoded images are read once into host memory (CIFAR-100: ~150 MB) and
decoded and augmented per example by tf.data; datasets above `MAX_IN_MEMORY_BYTES` (ImageNet)
are refused, as random access into TFDS's tfrecord files is not available.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from jaxkd.data import augment as augment_lib
from jaxkd.data.datasets import Dataset, local_batch_size, traced
from jaxkd.errors import ConfigError

if TYPE_CHECKING:
    from jaxkd.data.sampling import TrainData

MAX_IN_MEMORY_BYTES = 4 << 30


# --- the offline index ---------------------------------------------------------------------

def embed_in_order(embed_fn: Callable, batches, num_examples: int) -> np.ndarray:
    """float32 [num_examples, D]: row i is the embedding of the example with index i."""
    rows, order = [], []
    for batch in batches:
        keep = batch["mask"] > 0
        rows.append(np.asarray(embed_fn(batch["image"]), np.float32)[keep])
        order.append(batch["index"][keep])
    order = np.concatenate(order)
    if sorted(order.tolist()) != list(range(num_examples)):
        raise ValueError(f"expected indices 0..{num_examples - 1} once each")
    embeddings = np.empty((num_examples, rows[0].shape[-1]), np.float32)
    embeddings[order] = np.concatenate(rows)
    return embeddings


def top_k_neighbours(embeddings: np.ndarray, k: int, chunk_size: int = 1024) -> np.ndarray:
    """int32 [N, k]: each row's k most cosine-similar rows, most similar first (ties: lower
    row first), self excluded."""
    n = len(embeddings)
    if not 0 < k < n:
        raise ConfigError(f"cannot take {k} neighbours among {n} examples")
    x = np.asarray(embeddings, np.float32)
    normalised = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    out = np.empty((n, k), np.int32)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        similarity = normalised[start:stop] @ normalised.T
        similarity[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.lexsort((top, -np.take_along_axis(similarity, top, axis=1)), axis=1)
        out[start:stop] = np.take_along_axis(top, order, axis=1)
    return out


def index_path(workdir: str, index_size: int) -> str:
    return os.path.join(workdir, f"neighbours_top{index_size}.npy")


def load_or_build_index(path: str, index_size: int, num_examples: int,
                        embeddings_fn: Callable[[], np.ndarray]) -> np.ndarray:
    """The index saved at `path`, else `top_k_neighbours(embeddings_fn(), index_size)`,
    saved there."""
    if os.path.exists(path):
        return _load_index(path, index_size, num_examples)
    index = top_k_neighbours(embeddings_fn(), index_size)
    tmp = path + ".tmp.npy"
    np.save(tmp, index)
    os.replace(tmp, path)
    return index


def _load_index(path: str, index_size: int, num_examples: int) -> np.ndarray:
    index = np.load(path)
    if index.shape != (num_examples, index_size):
        raise ConfigError(f"neighbour index {path} has shape {index.shape}, expected "
                          f"{(num_examples, index_size)}; delete it to rebuild it")
    return index


def prepare_index(dataset: Dataset, embed_fn: Callable | None, path: str, *, index_size: int,
                  image_size: int, batch_size: int, process_count: int = 1) -> None:
    """Builds the index at `path` unless it is there, embedding the centre-cropped train split
    with `embed_fn(images float32 [B, H, W, 3] in [0, 1]) -> [B, D]` in batches of
    `batch_size` (the last one padded).

    Building needs the whole train split on one process: with several processes, build it
    first with a single-process run of the same config (the index file is then reused).
    """
    if embed_fn is None:
        raise ConfigError("dataset.sampler 'neighbours' needs a teacher to index the data")
    num_examples = dataset.info.num_train_examples

    def embeddings():
        if process_count > 1:
            raise ConfigError(f"no neighbour index at {path}: build it with a single-process "
                              "run of this config first")
        batches = dataset.centre_crop_train_batches(image_size=image_size,
                                                    batch_size=batch_size)
        return embed_in_order(embed_fn, batches, num_examples)

    load_or_build_index(path, index_size, num_examples, embeddings)


# --- the online sampler --------------------------------------------------------------------

def batch_example_ids(neighbours: np.ndarray, *, step: int, anchors: int, num_neighbours: int,
                      neighbour_pool: int, seed: int) -> np.ndarray:
    """int [anchors, 1 + num_neighbours] example ids of global batch `step`: each row is an
    anchor and `num_neighbours` distinct ids drawn from its first `neighbour_pool` neighbours."""
    n = len(neighbours)
    if num_neighbours > neighbour_pool or neighbour_pool > neighbours.shape[1]:
        raise ConfigError(f"need num_neighbours ({num_neighbours}) <= neighbour_pool "
                          f"({neighbour_pool}) <= index size ({neighbours.shape[1]})")
    steps_per_pass = n // anchors
    if steps_per_pass == 0:
        raise ConfigError(f"{n} train examples are fewer than {anchors} anchors per batch")
    anchor_pass, position = divmod(step, steps_per_pass)
    order = np.random.default_rng([seed, anchor_pass]).permutation(n)
    anchor_ids = order[position * anchors:(position + 1) * anchors]
    rng = np.random.default_rng([seed, anchor_pass, position, 1])
    picks = np.argsort(rng.random((anchors, neighbour_pool)), axis=1)[:, :num_neighbours]
    chosen = np.take_along_axis(neighbours[anchor_ids, :neighbour_pool], picks, axis=1)
    return np.concatenate([anchor_ids[:, None], chosen], axis=1)


def _read_encoded_train_split(dataset: Dataset) -> tf.Tensor:
    """The train split's encoded images as a tf.string tensor in index order."""
    index = dataset.example_index("train")
    num_examples = dataset.info.num_train_examples
    images = np.empty(num_examples, object)
    pairs = dataset.read(dataset.info.train_split).map(
        traced(lambda example: (example["image"], index(example["tfds_id"]))))
    for image, example_index in pairs.as_numpy_iterator():
        images[example_index] = image
    size = sum(len(image) for image in images)
    if size > MAX_IN_MEMORY_BYTES:
        raise ConfigError(f"the neighbour sampler holds the train split in memory; it has "
                          f"{size / 2**30:.1f} GiB of encoded images (limit "
                          f"{MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB)")
    return tf.constant(list(images))


@dataclasses.dataclass(frozen=True)
class NeighbourSampler:
    """CoSS's anchor + neighbour groups of `data`, from the index at `index_path` (built by
    `prepare`). No mixup/cutmix: mixing would blend the groups."""

    data: TrainData
    index_path: str
    index_size: int
    num_neighbours: int
    neighbour_pool: int

    def prepare(self, dataset: Dataset, *, embed_fn: Callable | None, batch_size: int,
                process_count: int = 1) -> None:
        """Builds the index unless it is there (`prepare_index`)."""
        prepare_index(dataset, embed_fn, self.index_path, index_size=self.index_size,
                      image_size=self.data.image_size, batch_size=batch_size,
                      process_count=process_count)

    def batches(self, dataset: Dataset, *, start_step: int = 0, process_index: int = 0,
                process_count: int = 1, local_device_count: int = 1
                ) -> Iterator[dict[str, np.ndarray]]:
        """Endless train batches of global_batch_size // process_count; each process takes
        its contiguous share of the global batch's groups. `local_device_count` is unused:
        nothing is drawn per device."""
        del local_device_count
        data = self.data
        group = 1 + self.num_neighbours
        local_batch = local_batch_size(data.global_batch_size, process_count)
        if local_batch % group:
            raise ConfigError(f"the per-process batch {local_batch} is not a multiple of "
                              f"1 + num_neighbours = {group}")
        if data.augment is not None and data.augment.mixes:
            raise ConfigError("mixup/cutmix mixes labels: not available with the neighbour "
                              "sampler")
        if not os.path.exists(self.index_path):
            raise ConfigError(f"no neighbour index at {self.index_path}: the sampler's "
                              "prepare step builds it (the trainer runs it before training)")
        neighbours = _load_index(self.index_path, self.index_size,
                                 dataset.info.num_train_examples)
        encoded = _read_encoded_train_split(dataset)
        labels = dataset.train_labels()
        transforms = augment_lib.example_transforms(data.augment, data.image_size)
        batch_transforms = augment_lib.batch_transforms(data.augment)
        anchors = data.global_batch_size // group
        local_groups = slice(process_index * (local_batch // group),
                             (process_index + 1) * (local_batch // group))
        num_neighbours, neighbour_pool, seed = self.num_neighbours, self.neighbour_pool, data.seed

        def step_ids():
            step = start_step
            while True:
                ids = batch_example_ids(neighbours, step=step, anchors=anchors,
                                        num_neighbours=num_neighbours,
                                        neighbour_pool=neighbour_pool, seed=seed)
                yield step, ids[local_groups].reshape(-1).astype(np.int32)
                step += 1

        example_seed = tf.constant(np.random.SeedSequence([seed, 7]).generate_state(2)
                                   .astype(np.int64))

        def load(step, ids):
            def one(position_and_id):
                position, example_id = position_and_id[0], position_and_id[1]
                image = dataset.decode_image(tf.gather(encoded, example_id))
                image_seed = tf.random.experimental.stateless_fold_in(
                    tf.random.experimental.stateless_fold_in(example_seed, step), position)
                return augment_lib.apply_example_transforms(image, image_seed, transforms)

            positions = tf.range(tf.shape(ids)[0], dtype=tf.int32)
            images = tf.map_fn(one, tf.stack([positions, ids], axis=1),
                               fn_output_signature=tf.float32)
            batch = {"image": images, "label": tf.gather(labels, ids), "index": ids}
            return augment_lib.apply_batch_transforms(
                batch, tf.random.experimental.stateless_fold_in(example_seed, -1 - step),
                batch_transforms)

        ds = tf.data.Dataset.from_generator(
            step_ids, output_signature=(tf.TensorSpec((), tf.int64),
                                        tf.TensorSpec((local_batch,), tf.int32)))
        ds = ds.map(traced(load), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
