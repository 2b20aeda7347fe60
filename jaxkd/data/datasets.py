"""Datasets: a TFDS dataset resolved once (`open_dataset`), with its sizes, the labels of its
train split and its unaugmented views (the eval split; the centre-cropped train split that
k-NN probes and CoSS's neighbour index embed).

Images are float32 in [0, 1] (per-model mean/std normalisation happens in the train step,
since teacher and student differ). Datasets other than `sklearn_digits` must already be
prepared: TFDS would otherwise try to download and, without network, retry for minutes;
`open_dataset` fails at once and says how to prepare them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxkd.data import augment as augment_lib
from jaxkd.data import digits  # noqa: F401  (registers `sklearn_digits` with TFDS)
from jaxkd.errors import ConfigError, JaxkdError

if tf.config.list_physical_devices("GPU"):
    tf.config.set_visible_devices([], "GPU")  # The accelerators belong to JAX.

_CIFAR100_HELP = """\
To prepare it, either
  * on a machine with internet: `tfds build cifar100 --data_dir {root}` and copy
    {root}/cifar100 to this machine's data dir, or
  * offline from the archive: put cifar-100-binary.tar.gz (from
    https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz, 168513733 bytes; TFDS checks its
    sha256) under that exact name into {root}/downloads/manual/ and run
    `tfds build cifar100 --data_dir {root}`: TFDS uses a file of the URL's name found in the
    manual dir instead of downloading it."""

_IMAGENET2012_HELP = """\
To prepare it, put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from
https://image-net.org/download-images, registration needed) into {root}/downloads/manual/ and
run `tfds build imagenet2012 --data_dir {root}` (hours; no network needed), or copy a prepared
{root}/imagenet2012 from another machine."""


@dataclasses.dataclass(frozen=True)
class _DatasetSpec:
    eval_split: str
    full_size: bool  # False: tiny images, eval is a plain resize; True: an EvalView.
    prepare_help: str | None  # None: prepared automatically.


_SPECS = {
    "sklearn_digits": _DatasetSpec("test", False, None),
    "cifar100": _DatasetSpec("test", False, _CIFAR100_HELP),
    "imagenet2012": _DatasetSpec("validation", True, _IMAGENET2012_HELP),
}
SUPPORTED_DATASETS = tuple(_SPECS)


class DatasetNotAvailableError(JaxkdError, RuntimeError):
    """The dataset is not prepared locally and preparing it needs data we do not have."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a trainer needs to size the model head, schedules and memory banks."""

    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    train_split: str
    eval_split: str


def _spec(name: str) -> _DatasetSpec:
    if name not in _SPECS:
        raise ConfigError(f"unknown dataset {name!r}; supported: {', '.join(SUPPORTED_DATASETS)}")
    return _SPECS[name]


def prepare(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns the prepared TFDS builder; prepares `sklearn_digits`, never downloads."""
    spec = _spec(name)
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    if spec.prepare_help is None:
        return _prepare_under_lock(name, builder.data_dir_root)
    raise DatasetNotAvailableError(
        f"dataset {name!r} is not prepared in data dir {builder.data_dir_root} (looked for "
        f"{builder.data_path}).\n" + spec.prepare_help.format(root=builder.data_dir_root))


def prepare_lock_path(name: str, data_dir_root) -> str:
    """The file locked while `name` is being prepared in data_dir_root."""
    return os.path.join(data_dir_root, f".{name}.prepare.lock")


def _prepare_under_lock(name: str, data_dir_root) -> tfds.core.DatasetBuilder:
    """Prepares a dataset once even when several local processes (JAX multi-process runs on
    one machine) start together: TFDS alone would have the second fail to rename its copy."""
    os.makedirs(data_dir_root, exist_ok=True)
    with open(prepare_lock_path(name, data_dir_root), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = tfds.builder(name, data_dir=os.fspath(data_dir_root))
        if not builder.is_prepared():
            builder.download_and_prepare()
        return builder


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by "
                         f"{process_count} processes")
    return global_batch_size // process_count


def traced(function):
    """Skips AutoGraph: the map functions hold no tensor-dependent Python control flow, and
    converting them costs more than the rest of building a pipeline."""
    return tf.autograph.experimental.do_not_convert(function)


class Dataset:
    """A prepared dataset: its TFDS builder, `info`, and the reading and decoding that the
    train samplers share. Build it with `open_dataset`.

    Every example carries "index", its position in the train (or eval) split; `train_fraction`
    < 1 keeps the first examples of 'train', indices 0 .. num_train_examples - 1.
    """

    def __init__(self, name: str, builder: tfds.core.DatasetBuilder, train_fraction: float):
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        self.name = name
        self.builder = builder
        self._spec = _spec(name)
        num_train = builder.info.splits["train"].num_examples
        train_split = "train"
        if train_fraction < 1.0:
            num_train = max(1, round(train_fraction * num_train))
            train_split = f"train[:{num_train}]"
        self.info = DatasetInfo(
            num_classes=builder.info.features["label"].num_classes,
            num_train_examples=num_train,
            num_eval_examples=builder.info.splits[self._spec.eval_split].num_examples,
            train_split=train_split,
            eval_split=self._spec.eval_split)
        self._train_labels: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {self.info})"

    # --- reading and decoding, shared by the samplers ---------------------------------------

    def read(self, split, shuffle_seed: int | None = None) -> tf.data.Dataset:
        """Encoded examples plus 'tfds_id'; images are decoded later, after any skip."""
        return self.builder.as_dataset(
            split=split, shuffle_files=shuffle_seed is not None,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(add_tfds_id=True, shuffle_seed=shuffle_seed))

    def decode_image(self, encoded: tf.Tensor) -> tf.Tensor:
        """An encoded image as float32 [H, W, 3] in [0, 1] (grey images repeated to RGB)."""
        image = tf.image.convert_image_dtype(
            self.builder.info.features["image"].decode_example(encoded), tf.float32)
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return image

    def example_index(self, split_name: str) -> Callable[[tf.Tensor], tf.Tensor]:
        """Maps an example's 'tfds_id' ("<file>-<shard>-of-<n>__<position in file>") to its
        int32 index in the split `split_name`, from the split's shard lengths."""
        shard_lengths = self.builder.info.splits[split_name].shard_lengths
        shard_offsets = tf.constant(np.cumsum([0] + list(shard_lengths[:-1])), tf.int64)

        def index(tfds_id):
            file_name_and_position = tf.strings.split(tfds_id, "__")
            shard = tf.strings.to_number(tf.strings.regex_replace(
                file_name_and_position[0], r"^.*-(\d+)-of-\d+$", r"\1"), tf.int64)
            position = tf.strings.to_number(file_name_and_position[-1], tf.int64)
            return tf.cast(tf.gather(shard_offsets, shard) + position, tf.int32)

        return index

    def decoder(self, split_name: str):
        """Maps an encoded example to (image float32 [H, W, 3] in [0, 1], label, index)."""
        index = self.example_index(split_name)

        def decode(example):
            return (self.decode_image(example["image"]), tf.cast(example["label"], tf.int32),
                    index(example["tfds_id"]))

        return decode

    def eval_transform(self, image: tf.Tensor, image_size: int,
                       view: augment_lib.EvalView | None = None) -> tf.Tensor:
        """The evaluation view of an image: a plain resize for tiny images, else timm's resize
        of the short side and centre crop, as `view` says (None: timm's defaults)."""
        if not self._spec.full_size:
            return augment_lib.resize(image, image_size)
        return augment_lib.resize_short_side_center_crop(image, image_size,
                                                         view or augment_lib.EvalView())

    # --- what trainers and probes read --------------------------------------------------------

    def train_labels(self) -> np.ndarray:
        """int32 [num_train_examples]: the label of each train example, indexed by the "index"
        of train batches (all processes' shares). Read once (labels only, no image decoding:
        for ImageNet one pass over the train files) and kept; read-only."""
        if self._train_labels is None:
            index = self.example_index("train")
            pairs = self.read(self.info.train_split).map(
                traced(lambda example: (tf.cast(example["label"], tf.int32),
                                        index(example["tfds_id"]))),
                num_parallel_calls=tf.data.AUTOTUNE).batch(8192)
            labels = np.full(self.info.num_train_examples, -1, np.int32)
            for batch_labels, batch_indices in pairs.as_numpy_iterator():
                labels[batch_indices] = batch_labels
            if np.any(labels < 0):
                raise RuntimeError(f"{self.name}: the train split's example indices do not "
                                   f"cover 0..{self.info.num_train_examples - 1}")
            labels.setflags(write=False)
            self._train_labels = labels
        return self._train_labels

    def eval_batches(self, *, global_batch_size: int, image_size: int, process_index: int = 0,
                     process_count: int = 1, view: augment_lib.EvalView | None = None
                     ) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the eval split: {"image", "label", "index", "mask"}, no augmentation
        (`eval_transform` with `view`).

        Processes read disjoint shares covering every example once. All processes yield the
        same number of batches (enough for the largest share); padding rows are zeros with
        mask 0.
        """
        info = self.info
        local_batch = local_batch_size(global_batch_size, process_count)
        local_split = tfds.even_splits(info.eval_split, n=process_count)[process_index]
        num_batches = math.ceil(math.ceil(info.num_eval_examples / process_count) / local_batch)
        decode = self.decoder(info.eval_split)

        def preprocess(example):
            image, label, index = decode(example)
            return {"image": self.eval_transform(image, image_size, view), "label": label,
                    "index": index}

        ds = self.read(local_split).map(traced(preprocess), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
        padding = {"image": np.zeros((local_batch, image_size, image_size, 3), np.float32),
                   "label": np.zeros(local_batch, np.int32),
                   "index": np.zeros(local_batch, np.int32),
                   "mask": np.zeros(local_batch, np.float32)}

        def batches():
            num_yielded = 0
            for batch in ds.as_numpy_iterator():
                size = len(batch["label"])
                batch["mask"] = np.ones(size, np.float32)
                yield {key: np.concatenate([value, padding[key][size:]])
                       for key, value in batch.items()}
                num_yielded += 1
            for _ in range(num_batches - num_yielded):
                yield {key: value.copy() for key, value in padding.items()}

        return batches()

    def centre_crop_train_batches(self, *, image_size: int, batch_size: int,
                                  view: augment_lib.EvalView | None = None
                                  ) -> Iterator[dict[str, np.ndarray]]:
        """The train split with the eval transform, on one process: {"image", "label",
        "index", "mask"}, all batches full (one compiled shape): the last one is padded, with
        mask 0 and index -1."""
        decode = self.decoder("train")

        def preprocess(example):
            image, label, index = decode(example)
            return {"image": self.eval_transform(image, image_size, view), "label": label,
                    "index": index, "mask": 1.0}

        ds = self.read(self.info.train_split).map(traced(preprocess),
                                                  num_parallel_calls=tf.data.AUTOTUNE)
        padding = tf.data.Dataset.from_tensors(
            {"image": tf.zeros((image_size, image_size, 3)), "label": 0, "index": -1,
             "mask": 0.0}).repeat(-self.info.num_train_examples % batch_size)
        ds = ds.concatenate(padding).batch(batch_size)
        return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def open_dataset(name: str, data_dir: str | None = None, train_fraction: float = 1.0
                 ) -> Dataset:
    """The prepared dataset `name` (`sklearn_digits` is prepared on first use); raises
    DatasetNotAvailableError at once, with instructions, when it is not prepared."""
    return Dataset(name, prepare(name, data_dir), train_fraction)
