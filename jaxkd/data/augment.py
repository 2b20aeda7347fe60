"""Image transforms run inside tf.data: the train-time augmentation and the eval resize.

Every per-example transform maps a float32 [H, W, 3] image in [0, 1] and a stateless seed
(int64 [2]) to an image, so the result depends only on (seed, epoch, example index): the same
run gives the same augmented batches whatever the tf.data parallelism, and a resumed run
continues them exactly.

Resizing antialiases when it shrinks, as PIL (timm's image backend) always does: without it a
224 px eval view of an ImageNet photo differed from PIL's by 5.6/255 on average (81/255 at
most), with it by 0.28/255 (bilinear: under 1/255 everywhere). Training resizes bilinearly
(timm's train.py draws bilinear or bicubic per image, `--train-interpolation random`);
evaluation uses the model's interpolation and crop (`EvalView`, from the model registry),
clipped to [0, 1] as PIL's uint8 output is. Up-sampling (8 px digits, 32 px CIFAR) is
the same either way.

Per-example transforms are listed by `example_transforms` (crop, MoCo v2's colour jitter,
grey-scale and blur, flip, RandAugment); batch-level
ones, seeded per step, by `batch_transforms` (mixup/cutmix, then random erasing). The ViT/MLP
student recipe's augmentations follow the official OFA-KD code (timm 0.6.5 `train.py` with its
default prefetcher): RandAugment on each image after crop and flip, mixup/cutmix on the batch
(`FastCollateMixup`, 'batch' mode), random erasing on the mixed batch (`PrefetchLoader`).
Deviations from timm, all because our images are float [0, 1] before the per-model
normalisation of the train step:
  * RandAugment's geometric ops fill with timm's default grey 128 (timm's train transform uses
    the dataset mean) and interpolate bilinearly (timm picks bilinear or bicubic per call).
  * Mixed images are not rounded to uint8 (`FastCollateMixup` rounds).
  * Random erasing ('pixel' mode) fills with uniform [0, 1) noise in image space, where timm
    draws N(0, 1) in the normalised space. Normal noise is not possible without one model's
    constants (teacher and student see the same batch) and would leave [0, 1]; after
    normalisation uniform noise has mean 0.07..0.42 and std 1.26..1.29 with ImageNet constants
    (-0.03..0.21 and 1.05..1.13 with CIFAR's): the first two moments of N(0, 1), roughly.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import tensorflow as tf

from jaxkd.data import photometric, randaugment

ExampleTransform = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
BatchTransform = Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]]

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # timm's default aspect-ratio range.
CROP_ATTEMPTS = 10  # as timm/torchvision before the central-crop fallback.
RESIZE_METHOD = tf.image.ResizeMethod.BILINEAR
EVAL_CROP_PCT = 0.875  # timm's default for ImageNet-size images.
INTERPOLATIONS = {"bilinear": tf.image.ResizeMethod.BILINEAR,
                  "bicubic": tf.image.ResizeMethod.BICUBIC}


@dataclasses.dataclass(frozen=True)
class EvalView:
    """How a model looks at a full-size image in evaluation, as timm's eval transform: the
    short side resized to floor(image_size / crop_pct) with `interpolation`, then the centre
    crop (the model's `pretrained_cfg` in timm; jaxkd's model registry here)."""

    crop_pct: float = EVAL_CROP_PCT
    interpolation: str = "bilinear"

    def __post_init__(self):
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got "
                             f"{self.interpolation!r}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Train augmentation switches; defaults are timm's, with the ViT-recipe extras off.

    randaugment: "" (off) or a timm RandAugment spec such as "rand-m9-mstd0.5-inc1".
    random_erasing: probability per image (timm's `--reprob`, 'pixel' mode, one box).
    mixup_alpha, cutmix_alpha: Beta concentrations, > 0 switches each on. With either on,
    batches carry soft labels float32 [B, num_classes], smoothed by `label_smoothing`.
    mixup_prob: probability that a batch is mixed at all; mixup_switch_prob: probability of
    cutmix rather than mixup when both are on (timm's `--mixup-prob`, `--mixup-switch-prob`).
    mix_per_device: each device's share of the process batch is mixed as a batch of its own
    (its own draws, pairs within the share), as the official runs mix each GPU's batch;
    False: one draw and one pairing for the whole process batch.
    crop_padding: > 0 (with random_resized_crop off) is torchvision's RandomCrop(image_size,
    padding=crop_padding) of CRD's CIFAR recipe: zero padding, then a uniformly placed window.
    colour_jitter_prob, grayscale_prob, blur_prob: MoCo v2's RandomApply(ColorJitter(
    *colour_jitter)), RandomGrayscale and RandomApply(GaussianBlur(blur_sigma)) after the crop
    (jaxkd.data.photometric); 0 switches each off.
    """

    random_resized_crop: bool = True
    scale_min: float = 0.08
    crop_padding: int = 0
    colour_jitter_prob: float = 0.0
    colour_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip: bool = True
    randaugment: str = ""
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    mix_per_device: bool = True

    def __post_init__(self):
        if self.randaugment:
            # A bad spec fails when the config is built.
            randaugment.parse_randaugment(self.randaugment)
        object.__setattr__(self, "colour_jitter", tuple(float(x) for x in self.colour_jitter))
        object.__setattr__(self, "blur_sigma", tuple(float(x) for x in self.blur_sigma))
        if (len(self.colour_jitter) != 4 or min(self.colour_jitter) < 0.0
                or self.colour_jitter[3] > 0.5):
            raise ValueError(f"colour_jitter is (brightness, contrast, saturation, hue) >= 0 "
                             f"with hue <= 0.5, got {self.colour_jitter}")
        if len(self.blur_sigma) != 2 or not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma is (min, max) with 0 < min <= max, got "
                             f"{self.blur_sigma}")
        for name in ("random_erasing", "mixup_prob", "mixup_switch_prob", "label_smoothing",
                     "colour_jitter_prob", "grayscale_prob", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.crop_padding < 0 or (self.crop_padding and self.random_resized_crop):
            raise ValueError(f"crop_padding must be >= 0 and needs random_resized_crop off, got "
                             f"{self.crop_padding} with random_resized_crop="
                             f"{self.random_resized_crop}")
        if self.mixup_alpha < 0.0 or self.cutmix_alpha < 0.0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got "
                             f"{self.mixup_alpha} and {self.cutmix_alpha}")

    @property
    def mixes(self) -> bool:
        """Whether mixup or cutmix is on, i.e. whether labels are soft."""
        return self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0

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
                           antialias=True)


def resize_short_side_center_crop(image: tf.Tensor, image_size: int,
                                  view: EvalView = EvalView()) -> tf.Tensor:
    """timm's eval transform: short side to floor(image_size / crop_pct), then centre crop."""
    scale_size = math.floor(image_size / view.crop_pct)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    # torchvision: the long side becomes int(scale_size * long / short).
    new_height = tf.where(height == short, scale_size, scale_size * height // short)
    new_width = tf.where(width == short, scale_size, scale_size * width // short)
    image = tf.image.resize(image, tf.stack([new_height, new_width]),
                            method=INTERPOLATIONS[view.interpolation], antialias=True)
    image = tf.clip_by_value(image, 0.0, 1.0)  # bicubic overshoots; PIL's uint8 cannot
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


def padded_random_crop(image: tf.Tensor, seed: tf.Tensor, *, image_size: int,
                       padding: int) -> tf.Tensor:
    """torchvision's RandomCrop(image_size, padding): the (resized) image zero-padded by
    `padding` on every side, then an image_size window at a uniformly drawn offset."""
    image = resize(image, image_size)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    return tf.image.stateless_random_crop(padded, tf.shape(image), seed)


def photometric_transforms(config: AugmentConfig) -> list[ExampleTransform]:
    """MoCo v2's colour jitter, grey-scale and blur, each applied with its probability."""
    transforms = []
    if config.colour_jitter_prob > 0.0:
        transforms.append(lambda image, seed: photometric.random_apply(
            config.colour_jitter_prob, lambda x, s: photometric.colour_jitter(
                x, s, config.colour_jitter), image, seed))
    if config.grayscale_prob > 0.0:
        transforms.append(lambda image, seed: photometric.random_apply(
            config.grayscale_prob, lambda x, s: photometric.grayscale(x), image, seed))
    if config.blur_prob > 0.0:
        low, high = config.blur_sigma
        transforms.append(lambda image, seed: photometric.random_apply(
            config.blur_prob, lambda x, s: photometric.gaussian_blur(
                x, tf.random.stateless_uniform([], s, low, high), high), image, seed))
    return transforms


def example_transforms(config: AugmentConfig | None, image_size: int) -> list[ExampleTransform]:
    """The per-example train transforms in order (timm's, with MoCo v2's photometric ones after
    the crop): crop or resize, colour jitter, grey-scale, blur, flip, RandAugment.

    `config=None` means no augmentation: a plain resize.
    """
    if config is not None and config.random_resized_crop:
        transforms = [lambda image, seed: random_resized_crop(
            image, seed, image_size=image_size, scale_min=config.scale_min)]
    elif config is not None and config.crop_padding:
        transforms = [lambda image, seed: padded_random_crop(
            image, seed, image_size=image_size, padding=config.crop_padding)]
    else:
        transforms = [lambda image, seed: resize(image, image_size)]
    if config is not None:
        transforms += photometric_transforms(config)
    if config is not None and config.flip:
        transforms.append(tf.image.stateless_random_flip_left_right)
    if config is not None and config.randaugment:
        spec = randaugment.parse_randaugment(config.randaugment)
        transforms.append(lambda image, seed: randaugment.rand_augment(image, seed, spec))
    return transforms


def batch_transforms(config: AugmentConfig | None, *, local_device_count: int = 1,
                     process_index: int = 0) -> list[BatchTransform]:
    """The batch-level train transforms of a process's batches in order: mixup/cutmix, then
    random erasing.

    Mixing needs one-hot labels float32 [B, num_classes] (the pipeline encodes them when
    `config.mixes`); it returns the smoothed, mixed targets in their place. With
    `config.mix_per_device` the batch is mixed in `local_device_count` equal chunks, keyed by
    their device's place among all devices (`process_index * local_device_count + chunk`).
    """
    transforms = []
    if config is not None and config.mixes:
        if config.mix_per_device:
            first_chunk = process_index * local_device_count
            transforms.append(lambda batch, seed: mixup_cutmix_per_chunk(
                batch, seed, config, num_chunks=local_device_count, first_chunk=first_chunk))
        else:
            transforms.append(lambda batch, seed: mixup_cutmix(batch, seed, config))
    if config is not None and config.random_erasing > 0.0:
        transforms.append(lambda batch, seed: random_erasing(
            batch, seed, probability=config.random_erasing))
    return transforms


def apply_example_transforms(image: tf.Tensor, seed: tf.Tensor,
                             transforms: list[ExampleTransform]) -> tf.Tensor:
    """Runs the transforms with an independent seed each."""
    for position, transform in enumerate(transforms):
        image = transform(image, tf.random.experimental.stateless_fold_in(seed, position))
    return image


def apply_batch_transforms(batch: dict[str, tf.Tensor], seed: tf.Tensor,
                           transforms: list[BatchTransform]) -> dict[str, tf.Tensor]:
    """Runs the transforms with an independent seed each."""
    for position, transform in enumerate(transforms):
        batch = transform(batch, tf.random.experimental.stateless_fold_in(seed, position))
    return batch


# Mixup and cutmix: timm's Mixup in 'batch' mode. One draw per batch decides whether to mix
# (mixup_prob), which of the two (mixup_switch_prob when both are on) and lambda ~ Beta(alpha,
# alpha); every row is mixed with the row at the mirrored position (timm's x.flip(0)). A
# "batch" here is one device's share by default (`mixup_cutmix_per_chunk`), as timm mixes each
# GPU's batch.


def cutmix_box(lam: tf.Tensor, center_y: tf.Tensor, center_x: tf.Tensor, height: tf.Tensor,
               width: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """timm's rand_bbox + cutmix_bbox_and_lam: a box of side fractions sqrt(1 - lam) about the
    centre, clipped to the image, as int32 [top, bottom, left, right) and the lambda corrected
    to the fraction of the image outside the box (float64)."""
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    ratio = tf.sqrt(1.0 - tf.cast(lam, tf.float64))
    cut_height = tf.cast(tf.floor(tf.cast(height, tf.float64) * ratio), tf.int32)
    cut_width = tf.cast(tf.floor(tf.cast(width, tf.float64) * ratio), tf.int32)
    top = tf.clip_by_value(center_y - cut_height // 2, 0, height)
    bottom = tf.clip_by_value(center_y + (cut_height + 1) // 2, 0, height)
    left = tf.clip_by_value(center_x - cut_width // 2, 0, width)
    right = tf.clip_by_value(center_x + (cut_width + 1) // 2, 0, width)
    area = tf.cast((bottom - top) * (right - left), tf.float64)
    return tf.stack([top, bottom, left, right]), 1.0 - area / tf.cast(height * width,
                                                                      tf.float64)


def mix_params(seed: tf.Tensor, config: AugmentConfig, height: tf.Tensor, width: tf.Tensor
               ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One batch's (use_cutmix bool, lambda float64, box int32 [4]) as timm draws them.

    lambda is 1 when the batch is not mixed and the corrected one under cutmix; the box is
    empty unless cutmix is used.
    """
    mix_seed, switch_seed, beta_seed, center_y_seed, center_x_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 5))
    mix = tf.random.stateless_uniform([], mix_seed) < config.mixup_prob
    if config.mixup_alpha > 0.0 and config.cutmix_alpha > 0.0:
        use_cutmix = tf.random.stateless_uniform([], switch_seed) < config.mixup_switch_prob
        alpha = tf.where(use_cutmix, tf.constant(config.cutmix_alpha, tf.float64),
                         tf.constant(config.mixup_alpha, tf.float64))
    else:
        use_cutmix = tf.constant(config.cutmix_alpha > 0.0)
        alpha = tf.constant(max(config.mixup_alpha, config.cutmix_alpha), tf.float64)
    gammas = tf.random.stateless_gamma([2], beta_seed, alpha=alpha, dtype=tf.float64)
    lam = tf.where(mix, gammas[0] / (gammas[0] + gammas[1]), tf.constant(1.0, tf.float64))
    use_cutmix = use_cutmix & mix
    center_y = tf.random.stateless_uniform([], center_y_seed, minval=0, maxval=height,
                                           dtype=tf.int32)
    center_x = tf.random.stateless_uniform([], center_x_seed, minval=0, maxval=width,
                                           dtype=tf.int32)
    box, cut_lam = cutmix_box(lam, center_y, center_x, height, width)
    return (use_cutmix, tf.where(use_cutmix, cut_lam, lam),
            tf.where(use_cutmix, box, tf.zeros_like(box)))


def mix_batch(images: tf.Tensor, one_hot_labels: tf.Tensor, use_cutmix: tf.Tensor,
              lam: tf.Tensor, box: tf.Tensor, label_smoothing: float
              ) -> tuple[tf.Tensor, tf.Tensor]:
    """Mixes images [B, H, W, C] with their mirrored rows and builds timm's mixup_target.

    Cutmix pastes the mirrored rows' box, mixup blends with weight lam (in float32 the blend
    of values in [0, 1] cannot exceed 1). Targets: smoothed one-hot (1 - s + s / C on the
    label, s / C elsewhere), mixed with the mirrored rows' by lam.
    """
    lam = tf.cast(lam, tf.float32)
    mirrored = tf.reverse(images, axis=[0])

    def cut():
        top, bottom, left, right = tf.unstack(box)
        shape = tf.shape(images)
        rows, cols = tf.range(shape[1])[:, None], tf.range(shape[2])[None, :]
        in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
        return tf.where(in_box[None, :, :, None], mirrored, images)

    mixed = tf.cond(use_cutmix, cut, lambda: images * lam + mirrored * (1.0 - lam))
    num_classes = tf.cast(tf.shape(one_hot_labels)[-1], tf.float32)
    smoothed = one_hot_labels * (1.0 - label_smoothing) + label_smoothing / num_classes
    targets = smoothed * lam + tf.reverse(smoothed, axis=[0]) * (1.0 - lam)
    return mixed, targets


def mixup_cutmix(batch: dict[str, tf.Tensor], seed: tf.Tensor, config: AugmentConfig
                 ) -> dict[str, tf.Tensor]:
    """The mixup/cutmix batch transform: one-hot "label" in, mixed soft targets out."""
    images = batch["image"]
    shape = tf.shape(images)
    use_cutmix, lam, box = mix_params(seed, config, shape[1], shape[2])
    images, targets = mix_batch(images, batch["label"], use_cutmix, lam, box,
                                config.label_smoothing)
    return {**batch, "image": images, "label": targets}


def mixup_cutmix_per_chunk(batch: dict[str, tf.Tensor], seed: tf.Tensor, config: AugmentConfig,
                           *, num_chunks: int, first_chunk: int = 0) -> dict[str, tf.Tensor]:
    """`mixup_cutmix` on each of `num_chunks` equal consecutive chunks of the batch, chunk c
    with seed `fold_in(seed, first_chunk + c)`: its own mix-or-not, kind, lambda and box, and
    pairs (mirrored rows) within the chunk."""
    images = tf.split(batch["image"], num_chunks)
    labels = tf.split(batch["label"], num_chunks)
    mixed = [mixup_cutmix({"image": chunk_images, "label": chunk_labels},
                          tf.random.experimental.stateless_fold_in(seed, first_chunk + chunk),
                          config)
             for chunk, (chunk_images, chunk_labels) in enumerate(zip(images, labels))]
    return {**batch, "image": tf.concat([m["image"] for m in mixed], axis=0),
            "label": tf.concat([m["label"] for m in mixed], axis=0)}


# Random erasing: timm's RandomErasing with one box per image ('pixel' mode, count 1), each
# image of the batch independently.

ERASE_AREA = (0.02, 1.0 / 3.0)  # timm's min_area, max_area (fractions of the image)
ERASE_ASPECT = (0.3, 1.0 / 0.3)  # timm's min_aspect and its default 1 / min_aspect
ERASE_ATTEMPTS = 10


def random_erasing_params(seed: tf.Tensor, batch_size: tf.Tensor, height: tf.Tensor,
                          width: tf.Tensor, probability: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Per image: int32 [B, 4] windows [top, left, height, width] (empty: not erased) and
    int64 [B, 2] seeds of their noise.

    As timm: erase with `probability`; up to 10 attempts of area fraction uniform in
    ERASE_AREA and log aspect (height / width) uniform in log(ERASE_ASPECT), sides rounded;
    the first attempt strictly smaller than the image is placed uniformly at random,
    otherwise nothing is erased.
    """
    apply_seed, area_seed, aspect_seed, top_seed, left_seed, noise_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 6))
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    apply = tf.random.stateless_uniform([batch_size], apply_seed) <= probability
    attempts = [batch_size, ERASE_ATTEMPTS]
    area = tf.cast(height * width, tf.float64) * tf.random.stateless_uniform(
        attempts, area_seed, minval=ERASE_AREA[0], maxval=ERASE_AREA[1], dtype=tf.float64)
    aspect = tf.exp(tf.random.stateless_uniform(
        attempts, aspect_seed, minval=math.log(ERASE_ASPECT[0]),
        maxval=math.log(ERASE_ASPECT[1]), dtype=tf.float64))
    erase_height = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    erase_width = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (erase_height < height) & (erase_width < width)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    erased = apply & tf.reduce_any(fits, axis=1)
    erase_height = tf.where(erased, tf.gather(erase_height, first, batch_dims=1), 0)
    erase_width = tf.where(erased, tf.gather(erase_width, first, batch_dims=1), 0)
    # Uniform integers in [0, height - erase_height] (timm's inclusive randint).
    top = tf.cast(tf.floor(tf.random.stateless_uniform([batch_size], top_seed, dtype=tf.float64)
                           * tf.cast(height - erase_height + 1, tf.float64)), tf.int32)
    left = tf.cast(tf.floor(tf.random.stateless_uniform([batch_size], left_seed,
                                                        dtype=tf.float64)
                            * tf.cast(width - erase_width + 1, tf.float64)), tf.int32)
    noise_seeds = tf.random.experimental.stateless_split(noise_seed, batch_size)
    return tf.stack([top, left, erase_height, erase_width], axis=1), noise_seeds


def erase(image: tf.Tensor, window: tf.Tensor, noise_seed: tf.Tensor) -> tf.Tensor:
    """Fills one image's window [top, left, height, width] with noise uniform in [0, 1),
    `tf.random.stateless_uniform([height, width, C], noise_seed)`."""
    top, left, erase_height, erase_width = tf.unstack(window)

    def erased():
        shape = tf.shape(image)
        noise = tf.random.stateless_uniform(tf.stack([erase_height, erase_width, shape[2]]),
                                            noise_seed)
        band = tf.concat([image[top:top + erase_height, :left], noise,
                          image[top:top + erase_height, left + erase_width:]], axis=1)
        return tf.concat([image[:top], band, image[top + erase_height:]], axis=0)

    return tf.cond(erase_height * erase_width > 0, erased, lambda: image)


def random_erasing(batch: dict[str, tf.Tensor], seed: tf.Tensor, probability: float
                   ) -> dict[str, tf.Tensor]:
    """The random-erasing batch transform (noise is drawn only for the erased windows)."""
    images = batch["image"]
    shape = tf.shape(images)
    windows, noise_seeds = random_erasing_params(seed, shape[0], shape[1], shape[2],
                                                 probability)
    images = tf.map_fn(lambda args: erase(*args), (images, windows, noise_seeds),
                       fn_output_signature=images.dtype)
    return {**batch, "image": images}
