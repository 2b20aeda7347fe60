"""scikit-learn's digits as a TFDS dataset: real images that ship with a package, so the whole
data path (TFDS builder, tf.data pipeline, training) runs and is tested without any download.

The 1797 8x8 images hold integers 0..16; they are stored as uint8 0..255
(`round(v * 255 / 16)`) with one channel. The split is fixed and stratified:
`sklearn.model_selection.train_test_split(test_size=360, stratify=labels, random_state=0)`
gives 1437 train and 360 test examples with every class in the same proportion in both.
"""

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST_EXAMPLES = 360
SPLIT_SEED = 0


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The documented split: {"train"|"test": (images uint8 [N, 8, 8, 1], labels, sklearn ids)}."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    train_ids, test_ids = train_test_split(
        np.arange(len(labels)), test_size=NUM_TEST_EXAMPLES, stratify=labels,
        random_state=SPLIT_SEED)
    return {split: (images[ids], labels[ids], ids)
            for split, ids in (("train", train_ids), ("test", test_ids))}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder `sklearn_digits`; `download_and_prepare` needs no network."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "scikit-learn digits, stratified 1437/360 split (seed 0)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="scikit-learn's 8x8 handwritten digits (UCI optdigits test set).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ships inside scikit-learn.
        return {split: self._generate_examples(*arrays)
                for split, arrays in digits_split().items()}

    def _generate_examples(self, images, labels, sklearn_ids):
        for image, label, sklearn_id in zip(images, labels, sklearn_ids):
            yield int(sklearn_id), {"image": image, "label": int(label)}
