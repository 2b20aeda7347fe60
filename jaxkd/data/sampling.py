"""Which train batches a run reads: the typed train-data settings and the sampler protocol;
`config.dataset.sampler` picks the sampler."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from jaxkd.data import neighbours
from jaxkd.data.augment import AugmentConfig
from jaxkd.data.datasets import Dataset
from jaxkd.data.pipeline import RandomSampler
from jaxkd.errors import ConfigError

SAMPLERS = ("random", "neighbours")


@dataclasses.dataclass(frozen=True)
class TrainData:
    """What every sampler reads of a run config: global batch size, image size, seed and the
    augmentation (None: a plain resize)."""

    global_batch_size: int
    image_size: int
    seed: int
    augment: AugmentConfig | None

    @classmethod
    def from_config(cls, config) -> TrainData:
        """From a run config: `batch_size`, `dataset.image_size`, `seed`, `augment`."""
        return cls(global_batch_size=config.batch_size, image_size=config.dataset.image_size,
                   seed=config.seed, augment=AugmentConfig.from_config(config.augment))


class Sampler(Protocol):
    """Endless train batches {"image", "label", "index"} of a dataset, resumable at any step.

    `prepare` runs once before any batch is read, with the teacher's `embed_fn(images float32
    [B, H, W, 3] in [0, 1]) -> [B, D]` (None without a teacher) for samplers that index the
    data. `batches` yields this process's share (global batch // process_count) of batch
    `start_step`, `start_step + 1`, ...; per-device draws (mixup/cutmix) split it into
    `local_device_count` equal chunks.
    """

    data: TrainData

    def prepare(self, dataset: Dataset, *, embed_fn: Callable | None, batch_size: int,
                process_count: int = 1) -> None: ...

    def batches(self, dataset: Dataset, *, start_step: int = 0, process_index: int = 0,
                process_count: int = 1, local_device_count: int = 1
                ) -> Iterator[dict[str, np.ndarray]]: ...


def make_sampler(config, workdir: str, sampler: str) -> Sampler:
    """The sampler named `sampler` (a run's `config.dataset.sampler`, or its method's) for a
    run config: 'random' (shuffled, augmented batches) or 'neighbours' (CoSS's anchor +
    neighbour groups, with `config.dataset`'s group sizes, its index kept in `workdir`)."""
    data = TrainData.from_config(config)
    ds = config.dataset
    if sampler == "random":
        return RandomSampler(data)
    if sampler == "neighbours":
        return neighbours.NeighbourSampler(
            data, index_path=neighbours.index_path(workdir, ds.index_size),
            index_size=ds.index_size, num_neighbours=ds.num_neighbours,
            neighbour_pool=ds.neighbour_pool)
    raise ConfigError(f"dataset.sampler must be one of {SAMPLERS}, got {sampler!r}")
