"""Input pipelines: TFDS datasets (scikit-learn digits built in, CIFAR-100, ImageNet) as numpy
batches. Importing this package registers the `sklearn_digits` TFDS builder. No module here
imports JAX: the trainer passes in what runs on the accelerators (the teacher's embedding).

`open_dataset` resolves a dataset once; a sampler (`make_sampler`, or `RandomSampler` /
`NeighbourSampler` over a `TrainData`) turns it into train batches."""

from jaxkd.data.augment import AugmentConfig, EvalView
from jaxkd.data.datasets import (
    SUPPORTED_DATASETS,
    Dataset,
    DatasetInfo,
    DatasetNotAvailableError,
    open_dataset,
    prepare,
)
from jaxkd.data.digits import SklearnDigits
from jaxkd.data.neighbours import NeighbourSampler
from jaxkd.data.pipeline import RandomSampler
from jaxkd.data.sampling import SAMPLERS, Sampler, TrainData, make_sampler

__all__ = [
    "SAMPLERS",
    "SUPPORTED_DATASETS",
    "AugmentConfig",
    "Dataset",
    "DatasetInfo",
    "DatasetNotAvailableError",
    "EvalView",
    "NeighbourSampler",
    "RandomSampler",
    "Sampler",
    "SklearnDigits",
    "TrainData",
    "make_sampler",
    "open_dataset",
    "prepare",
]
