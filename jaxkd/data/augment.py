"""Image transforms run inside tf.data: the train-time augmentation and the eval resize.

Every per-example transform maps a float32 [H, W, 3] image in [0, 1] and a stateless seed
(int64 [2]) to an image, so the result depends only on (seed, epoch, example index): the same
run gives the same augmented batches whatever the tf.data parallelism, and a resumed run
continues them exactly.

Resizing is bilinear with antialias=False. timm's train.py picks bilinear or bicubic at random
per image (`--train-interpolation random`) and evaluates with the model's interpolation
(bicubic for most ViTs); we use bilinear everywhere because it never leaves [0, 1] (bicubic
overshoots) and, for the up-sampling of 8 px and 32 px images, antialiasing does nothing.

Plug-in points: per-example transforms (RandAugment, random erasing) go into the list built by
`example_transforms`; batch-level ones (mixup, cutmix) into `batch_transforms`.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import tensorflow as tf

ExampleTransform = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
BatchTransform = Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]]

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # timm's default aspect-ratio range.
CROP_ATTEMPTS = 10  # as timm/torchvision before the central-crop fallback.
RESIZE_METHOD = tf.image.ResizeMethod.BILINEAR


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Train augmentation switches (timm defaults)."""

    random_resized_crop: bool = True
    scale_min: float = 0.08
    flip: bool = True

    @classmethod
    def from_config(cls, config: "AugmentConfig | Mapping[str, Any] | ml_collections.ConfigDict"
                    ) -> "AugmentConfig":
        """Builds from a dict or ConfigDict; unknown fields raise (a typo must not go unseen)."""
        if isinstance(config, cls):
            return config
        if isinstance(config, ml_collections.ConfigDict):
            config = config.to_dict()
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown augmentation fields {unknown}; known: {sorted(known)}")
        return cls(**config)


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Plain resize to image_size x image_size (aspect ratio not kept)."""
    return tf.image.resize(image, (image_size, image_size), method=RESIZE_METHOD,
                           antialias=False)


def resize_short_side_center_crop(image: tf.Tensor, image_size: int,
                                  crop_pct: float) -> tf.Tensor:
    """timm's eval transform: short side to floor(image_size / crop_pct), then centre crop."""
    scale_size = math.floor(image_size / crop_pct)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    # torchvision: the long side becomes int(scale_size * long / short).
    new_height = tf.where(height == short, scale_size, scale_size * height // short)
    new_width = tf.where(width == short, scale_size, scale_size * width // short)
    image = tf.image.resize(image, tf.stack([new_height, new_width]), method=RESIZE_METHOD,
                            antialias=False)
    top = tf.cast(tf.round(tf.cast(new_height - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_width - image_size, tf.float32) / 2.0), tf.int32)
    return image[top:top + image_size, left:left + image_size, :]


def random_resized_crop_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                               scale: tuple[float, float],
                               ratio: tuple[float, float] = CROP_RATIO) -> tf.Tensor:
    """timm's RandomResizedCrop.get_params as int32 [top, left, crop_height, crop_width].

    Up to 10 attempts: area fraction uniform in `scale`, log aspect ratio uniform in
    log(`ratio`); the first window that fits is placed uniformly at random. Otherwise a
    central crop with the aspect ratio clamped to `ratio`. A window must also be at least 1 px
    wide and high (timm does not check; it only matters for images of a few pixels).
    """
    area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    target_area = height_f * width_f * tf.random.stateless_uniform(
        [CROP_ATTEMPTS], area_seed, minval=scale[0], maxval=scale[1])
    aspect = tf.exp(tf.random.stateless_uniform(
        [CROP_ATTEMPTS], ratio_seed, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    crop_width = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    crop_height = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = ((crop_width >= 1) & (crop_width <= width)
            & (crop_height >= 1) & (crop_height <= height))
    first = tf.argmax(tf.cast(fits, tf.int32))
    random_height, random_width = crop_height[first], crop_width[first]
    # The maximum keeps the range valid when no attempt fits (the result is then unused).
    random_top = tf.random.stateless_uniform(
        [], top_seed, minval=0, maxval=tf.maximum(height - random_height + 1, 1),
        dtype=tf.int32)
    random_left = tf.random.stateless_uniform(
        [], left_seed, minval=0, maxval=tf.maximum(width - random_width + 1, 1),
        dtype=tf.int32)

    in_ratio = width_f / height_f
    min_ratio, max_ratio = min(ratio), max(ratio)
    fallback_width = tf.where(
        in_ratio > max_ratio, tf.cast(tf.round(height_f * max_ratio), tf.int32), width)
    fallback_height = tf.where(
        in_ratio < min_ratio, tf.cast(tf.round(width_f / min_ratio), tf.int32), height)
    any_fits = tf.reduce_any(fits)
    crop_height = tf.where(any_fits, random_height, fallback_height)
    crop_width = tf.where(any_fits, random_width, fallback_width)
    top = tf.where(any_fits, random_top, (height - fallback_height) // 2)
    left = tf.where(any_fits, random_left, (width - fallback_width) // 2)
    return tf.stack([top, left, crop_height, crop_width])


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, *, image_size: int,
                        scale_min: float) -> tf.Tensor:
    """Crops a timm-style random window and resizes it to image_size x image_size."""
    shape = tf.shape(image)
    top, left, crop_height, crop_width = tf.unstack(
        random_resized_crop_window(shape[0], shape[1], seed, scale=(scale_min, 1.0)))
    crop = image[top:top + crop_height, left:left + crop_width, :]
    return resize(crop, image_size)


def example_transforms(config: AugmentConfig | None, image_size: int) -> list[ExampleTransform]:
    """The per-example train transforms in order; the first one sets the size.

    `config=None` means no augmentation: a plain resize. RandAugment and random erasing will
    be appended here.
    """
    if config is not None and config.random_resized_crop:
        transforms = [lambda image, seed: random_resized_crop(
            image, seed, image_size=image_size, scale_min=config.scale_min)]
    else:
        transforms = [lambda image, seed: resize(image, image_size)]
    if config is not None and config.flip:
        transforms.append(tf.image.stateless_random_flip_left_right)
    return transforms


def batch_transforms(config: AugmentConfig | None) -> list[BatchTransform]:
    """The batch-level train transforms (mixup and cutmix will go here); none exist yet."""
    del config
    return []


def apply_example_transforms(image: tf.Tensor, seed: tf.Tensor,
                             transforms: list[ExampleTransform]) -> tf.Tensor:
    """Runs the transforms with an independent seed each."""
    for position, transform in enumerate(transforms):
        image = transform(image, tf.random.experimental.stateless_fold_in(seed, position))
    return image
