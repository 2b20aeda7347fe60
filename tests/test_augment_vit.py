"""The ViT/MLP-student augmentations (RandAugment, mixup/cutmix, random erasing): timm's PIL ops
and Mixup on the same draws, NumPy references eagerly and inside tf.data, per-device mixing,
pipeline resume."""

import itertools
import math
import random
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from jaxkd.data import augment as augment_lib
from jaxkd.data import randaugment
from jaxkd.errors import ConfigError

from helpers import sampler_batches

DIGITS = "sklearn_digits"
VIT_RECIPE = {"randaugment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25,
              "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ALL_OPS = tuple(dict.fromkeys(randaugment.RANDAUGMENT_OPS
                              + randaugment.RANDAUGMENT_INCREASING_OPS))
GREY = (128, 128, 128)


def timm_data():
    from jaxkd.convert.timm_import import import_timm

    import_timm()
    from timm.data import auto_augment, mixup, random_erasing

    return auto_augment, mixup, random_erasing


def sample_images():
    """A full-range noise image and a low-contrast, skewed one (AutoContrast and Equalize have
    work to do), neither square."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (37, 45, 3))
    skewed = 40 + np.round(150 * rng.random((37, 45, 3)) ** 3)
    return [image.astype(np.uint8) for image in (noise, skewed)]


def assert_levels_match_pil(ours, theirs, geometric):
    """Exact, except that a geometric op may differ by one level on 0.1% of the pixels: PIL
    truncates its bilinear value, and a value within an ulp of an integer can fall either
    side with another libm's sin and cos."""
    difference = np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))
    if geometric:
        assert difference.max() <= 1 and np.mean(difference > 0) <= 1e-3
    else:
        np.testing.assert_array_equal(difference, 0)


def test_defaults_are_off_and_config_validated():
    config = augment_lib.AugmentConfig.from_config({})
    assert (config.randaugment, config.random_erasing, config.mixup_alpha,
            config.cutmix_alpha, config.label_smoothing) == ("", 0.0, 0.0, 0.0, 0.0)
    assert not config.mixes
    assert len(augment_lib.example_transforms(config, 16)) == 2  # crop, flip
    assert augment_lib.batch_transforms(config) == []
    recipe = augment_lib.AugmentConfig.from_config(VIT_RECIPE)
    assert recipe.mixes and (recipe.mixup_prob, recipe.mixup_switch_prob) == (1.0, 0.5)
    assert len(augment_lib.example_transforms(recipe, 16)) == 3
    assert len(augment_lib.batch_transforms(recipe)) == 2
    for bad in ({"random_erasing": 1.5}, {"mixup_alpha": -1.0}, {"randaugment": "rand-x3"},
                {"randaugment": "rand-m9-tweights"}, {"randaugment": "augmix-m3"}):
        with pytest.raises(ValueError):
            augment_lib.AugmentConfig.from_config(bad)


@pytest.mark.parametrize("spec_string", ["rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1",
                                         "rand-n3-m7-p0.8-mstd101-mmax12"])
def test_randaugment_spec_parsed_as_timm(spec_string):
    auto_augment, _, _ = timm_data()
    theirs = auto_augment.rand_augment_transform(spec_string, {"img_mean": GREY})
    spec = randaugment.parse_randaugment(spec_string)
    assert spec.num_layers == theirs.num_layers
    assert spec.op_names == tuple(op.name for op in theirs.ops)
    for op in theirs.ops:
        assert (spec.magnitude, spec.prob) == (op.magnitude, op.prob)
        assert spec.magnitude_std == op.magnitude_std
        assert spec.magnitude_max == (op.magnitude_max or auto_augment._LEVEL_DENOM)


@pytest.mark.parametrize("name", ALL_OPS)
def test_randaugment_op_matches_timm_pil(name, monkeypatch):
    """Each op at magnitudes 9 and 5.3 with both signs, on uint8 images, against timm's op with
    PIL bilinear resampling and grey fill."""
    auto_augment, _, _ = timm_data()
    level_to_arg = auto_augment.LEVEL_TO_ARG[name]
    for image, magnitude, negate in itertools.product(sample_images(), (9.0, 5.3),
                                                      (False, True)):
        # timm negates a signed argument when random.random() > 0.5.
        monkeypatch.setattr(auto_augment, "random",
                            types.SimpleNamespace(random=lambda draw=0.9 if negate else 0.1:
                                                  draw))
        arguments = level_to_arg(magnitude, {}) if level_to_arg else ()
        theirs = auto_augment.NAME_TO_OP[name](Image.fromarray(image), *arguments,
                                               fillcolor=GREY, resample=Image.BILINEAR)
        ours = randaugment.randaugment_op(name, tf.constant(image, tf.float32),
                                          tf.constant(magnitude, tf.float64),
                                          tf.constant(negate))
        assert ours.shape == image.shape
        assert_levels_match_pil(ours.numpy(), np.asarray(theirs), name in GEOMETRIC_OPS)
    if name in ("Equalize", "AutoContrast"):  # The skewed image is really changed.
        assert not np.array_equal(ours.numpy(), image)


def test_posterize_increasing_at_magnitude_10_keeps_no_bits():
    """timm asks PIL for 0 bits here (reached when the noisy magnitude is clipped to 10);
    PIL 13 refuses, the PIL of the official code returned black."""
    auto_augment, _, _ = timm_data()
    assert auto_augment.LEVEL_TO_ARG["PosterizeIncreasing"](10.0, {}) == (0,)
    image = sample_images()[0]
    ours = randaugment.randaugment_op("PosterizeIncreasing", tf.constant(image, tf.float32),
                                      tf.constant(10.0, tf.float64), tf.constant(False))
    np.testing.assert_array_equal(ours, 0)
    np.testing.assert_array_equal(np.asarray(ImageOps.posterize(Image.fromarray(image), 1)),
                                  randaugment.randaugment_op(
                                      "PosterizeIncreasing", tf.constant(image, tf.float32),
                                      tf.constant(7.5, tf.float64), tf.constant(False)))


class ReplayedRandom:
    """Stands in for the `random` module in timm's auto_augment: returns our draws of the
    current layer (the first random() is the apply draw, a second one the sign draw)."""

    def __init__(self, draws, spec):
        self.draws, self.spec = draws, spec
        self.layer, self.uniform_calls, self.gauss_calls = None, 0, 0

    def start_layer(self, layer):
        self.layer, self.uniform_calls = layer, 0

    def random(self):
        key = ("apply_draw", "sign_draw")[self.uniform_calls]
        self.uniform_calls += 1
        return float(self.draws[key][self.layer])

    def gauss(self, mean, std):
        assert (mean, std) == (self.spec.magnitude, self.spec.magnitude_std)
        self.gauss_calls += 1
        return float(self.draws["magnitude"][self.layer])


@pytest.mark.parametrize("spec_string", ["rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1"])
def test_rand_augment_matches_timm_randaugment_on_same_draws(spec_string, monkeypatch):
    """Whole RandAugment (op choice, apply probability, magnitude noise and clipping, signs)
    against timm's RandAugment replaying our random numbers."""
    auto_augment, _, _ = timm_data()
    spec = randaugment.parse_randaugment(spec_string)
    theirs = auto_augment.rand_augment_transform(
        spec_string, {"img_mean": GREY, "interpolation": Image.BILINEAR})
    image = sample_images()[1]
    applied = 0
    for seed in range(16):
        seed = tf.constant([seed, 5], tf.int64)
        draws = {key: value.numpy()
                 for key, value in randaugment.randaugment_draws(seed, spec).items()}
        replayed = ReplayedRandom(draws, spec)
        monkeypatch.setattr(auto_augment, "random", replayed)

        def choose(ops, count, replace, p, replayed=replayed, draws=draws):
            assert count == spec.num_layers and replace and p is None
            return [lambda img, layer=layer: (replayed.start_layer(layer),
                                              ops[draws["op"][layer]](img))[1]
                    for layer in range(count)]

        monkeypatch.setattr(np.random, "choice", choose)
        expected = np.asarray(theirs(Image.fromarray(image)))
        ours = randaugment.rand_augment(tf.constant(image / 255.0, tf.float32), seed, spec)
        geometric = any(spec.op_names[op] in GEOMETRIC_OPS for op in draws["op"])
        assert_levels_match_pil(ours.numpy() * 255.0, expected, geometric)
        applied += replayed.gauss_calls
    assert 8 <= applied <= 24  # About half of the 32 layers ran.


def test_rand_augment_same_inside_tf_data_and_on_the_grid():
    spec = randaugment.parse_randaugment("rand-m9-mstd0.5-inc1")
    rng = np.random.default_rng(1)
    images = rng.random((12, 24, 20, 3)).astype(np.float32)
    seeds = np.stack([np.full(12, 3), np.arange(12)], axis=1).astype(np.int64)
    dataset = tf.data.Dataset.from_tensor_slices((images, seeds)).map(
        lambda image, seed: randaugment.rand_augment(image, seed, spec))
    in_pipeline = np.stack(list(dataset.as_numpy_iterator()))
    eager = np.stack([randaugment.rand_augment(tf.constant(image), tf.constant(seed), spec)
                      for image, seed in zip(images, seeds)])
    np.testing.assert_array_equal(in_pipeline, eager)
    assert in_pipeline.min() >= 0.0 and in_pipeline.max() <= 1.0
    np.testing.assert_allclose(in_pipeline * 255.0, np.round(in_pipeline * 255.0), atol=1e-4)
    # Most images changed beyond the rounding to the grid.
    changed = np.abs(in_pipeline - images).max(axis=(1, 2, 3)) > 1.0 / 255.0
    assert changed.mean() > 0.5


def mean_within(sample, expected_mean, count_sigmas=4.0):
    standard_error = np.std(sample) / math.sqrt(len(sample))
    return abs(np.mean(sample) - expected_mean) < count_sigmas * standard_error


def test_randaugment_draw_distribution():
    """timm: uniform op choice with replacement, apply when random() <= 0.5, magnitude
    N(9, 0.5), negate when random() > 0.5."""
    spec = randaugment.parse_randaugment("rand-m9-mstd0.5")
    seeds = tf.stack([tf.fill([3000], tf.constant(11, tf.int64)),
                      tf.range(3000, dtype=tf.int64)], axis=1)
    draws = tf.function(lambda seeds: tf.map_fn(
        lambda seed: randaugment.randaugment_draws(seed, spec), seeds,
        fn_output_signature={"op": tf.int32, "apply_draw": tf.float32,
                             "magnitude": tf.float64, "sign_draw": tf.float32}))(seeds)
    ops = draws["op"].numpy().ravel()
    counts = np.bincount(ops, minlength=15)
    expected = len(ops) / 15
    assert len(counts) == 15 and np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))
    for key in ("apply_draw", "sign_draw"):
        assert mean_within(draws[key].numpy().ravel() <= 0.5, 0.5)
    magnitude = draws["magnitude"].numpy().ravel()
    assert mean_within(magnitude, 9.0) and abs(np.std(magnitude) - 0.5) < 0.03
    # The two layers of an image are independent.
    assert abs(np.corrcoef(draws["magnitude"].numpy().T)[0, 1]) < 0.1


# Mixup and cutmix.

def numpy_cutmix_box(lam, center_y, center_x, height, width):
    """timm's rand_bbox and lambda correction, from its formulas."""
    cut_height = int(height * math.sqrt(1.0 - lam))
    cut_width = int(width * math.sqrt(1.0 - lam))
    top = min(max(center_y - cut_height // 2, 0), height)
    bottom = min(max(center_y + (cut_height + 1) // 2, 0), height)
    left = min(max(center_x - cut_width // 2, 0), width)
    right = min(max(center_x + (cut_width + 1) // 2, 0), width)
    return (top, bottom, left, right), 1.0 - (bottom - top) * (right - left) / (height * width)


def numpy_mix(images, labels, num_classes, use_cutmix, lam, box, smoothing):
    """Batch-mode mixup/cutmix with mirrored-row pairing and smoothed targets."""
    mirrored = images[::-1]
    if use_cutmix:
        top, bottom, left, right = box
        mixed = images.copy()
        mixed[:, top:bottom, left:right] = mirrored[:, top:bottom, left:right]
    else:
        mixed = images * lam + mirrored * (1.0 - lam)
    targets = np.full((len(labels), num_classes), smoothing / num_classes)
    targets[np.arange(len(labels)), labels] += 1.0 - smoothing
    return mixed, targets * lam + targets[::-1] * (1.0 - lam)


def batch_of(batch_size=6, height=10, width=14, num_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((batch_size, height, width, 3)).astype(np.float32),
            rng.integers(0, num_classes, batch_size).astype(np.int32))


# (mix draw, switch draw, lambda drawn, centre y, centre x): cutmix inside, cutmix clipped at a
# corner, a box too small to cut (lambda becomes 1), mixup, no mixing at all.
MIX_CASES = [(0.1, 0.2, 0.45, 5, 7), (0.1, 0.2, 0.3, 0, 13), (0.1, 0.2, 0.999, 4, 4),
             (0.1, 0.7, 0.35, 5, 7), (0.9, 0.2, 0.35, 5, 7)]


@pytest.mark.parametrize("mix_draw,switch_draw,drawn_lam,center_y,center_x", MIX_CASES)
def test_mix_batch_matches_numpy_and_timm_mixup(mix_draw, switch_draw, drawn_lam, center_y,
                                                center_x, monkeypatch):
    _, mixup, _ = timm_data()
    import torch

    images, labels = batch_of()
    mixes, use_cutmix = mix_draw < 0.5, mix_draw < 0.5 and switch_draw < 0.5
    box, cut_lam = numpy_cutmix_box(drawn_lam, center_y, center_x, 10, 14)
    lam = cut_lam if use_cutmix else drawn_lam if mixes else 1.0
    expected_images, expected_targets = numpy_mix(images, labels, 5, use_cutmix, lam, box, 0.1)

    tf_box, tf_cut_lam = augment_lib.cutmix_box(tf.constant(drawn_lam, tf.float64), center_y,
                                                center_x, 10, 14)
    np.testing.assert_array_equal(tf_box, box)
    assert tf_cut_lam.numpy() == pytest.approx(cut_lam, abs=1e-12)
    ours_images, ours_targets = augment_lib.mix_batch(
        tf.constant(images), tf.one_hot(labels, 5), tf.constant(use_cutmix),
        tf.constant(lam, tf.float64), tf.constant(box if use_cutmix else (0, 0, 0, 0)), 0.1)
    np.testing.assert_allclose(ours_images, expected_images, atol=1e-6)
    np.testing.assert_allclose(ours_targets, expected_targets, atol=1e-6)

    # timm draws rand() for mixing and switching, beta(), then randint() for the centre.
    uniform_draws, centers = [mix_draw, switch_draw], [center_y, center_x]
    monkeypatch.setattr(np.random, "rand", lambda *shape: uniform_draws.pop(0))
    monkeypatch.setattr(np.random, "beta", lambda a, b: drawn_lam)
    monkeypatch.setattr(np.random, "randint", lambda low, high, size=None: centers.pop(0))
    theirs = mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5, switch_prob=0.5,
                         mode="batch", label_smoothing=0.1, num_classes=5)
    timm_images, timm_targets = theirs(torch.from_numpy(images).permute(0, 3, 1, 2).clone(),
                                       torch.from_numpy(labels).long())
    assert len(uniform_draws) == (0 if mixes else 1) and (not centers or not use_cutmix)
    np.testing.assert_allclose(ours_images, timm_images.permute(0, 2, 3, 1).numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(ours_targets, timm_targets.numpy(), atol=1e-6)


def test_mixup_cutmix_inside_tf_data_matches_numpy_reference():
    config = augment_lib.AugmentConfig.from_config(VIT_RECIPE)
    images, labels = batch_of(batch_size=8, num_classes=7)
    seeds = np.stack([np.full(10, 2), np.arange(10)], axis=1).astype(np.int64)
    dataset = tf.data.Dataset.from_tensor_slices(seeds).map(
        lambda seed: augment_lib.mixup_cutmix(
            {"image": tf.constant(images), "label": tf.one_hot(labels, 7)}, seed, config))
    kinds = set()
    for seed, batch in zip(seeds, dataset.as_numpy_iterator()):
        use_cutmix, lam, box = (value.numpy() for value in augment_lib.mix_params(
            tf.constant(seed), config, 10, 14))
        kinds.add(bool(use_cutmix))
        expected_images, expected_targets = numpy_mix(images, labels, 7, use_cutmix, lam,
                                                      box, 0.1)
        np.testing.assert_allclose(batch["image"], expected_images, atol=1e-6)
        np.testing.assert_allclose(batch["label"], expected_targets, atol=1e-6)
        assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
        np.testing.assert_allclose(batch["label"].sum(axis=1), 1.0, atol=1e-6)
    assert kinds == {False, True}


def test_mix_params_distribution():
    """Mixed with mixup_prob, cutmix with mixup_switch_prob, lambda ~ Beta(0.8, 0.8) under
    mixup, the cutmix lambda equal to the box's complement."""
    config = augment_lib.AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=0.8)
    seeds = tf.stack([tf.fill([3000], tf.constant(4, tf.int64)),
                      tf.range(3000, dtype=tf.int64)], axis=1)
    use_cutmix, lam, box = (value.numpy() for value in tf.function(lambda seeds: tf.map_fn(
        lambda seed: augment_lib.mix_params(seed, config, 32, 24), seeds,
        fn_output_signature=(tf.bool, tf.float64, tf.int32)))(seeds))
    mixed = use_cutmix | (lam < 1.0)
    assert mean_within(mixed, 0.8) and mean_within(use_cutmix[mixed], 0.5)
    mixup_lam = lam[mixed & ~use_cutmix]
    assert mean_within(mixup_lam, 0.5)
    assert abs(np.var(mixup_lam) - 1.0 / (4 * (2 * 0.8 + 1))) < 0.01  # Beta(a, a) variance.
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    np.testing.assert_allclose(lam[use_cutmix], 1.0 - area[use_cutmix] / (32 * 24))
    assert np.all(area[~use_cutmix] == 0)


def test_mixup_cutmix_per_chunk_mixes_each_chunk_on_its_own():
    """8 chunks of 4 rows: chunk c is mixed as a batch of its own with the seed
    fold_in(seed, first_chunk + c) (its own draws; pairs within the chunk), and
    batch_transforms keys a process's chunks by their devices' global places."""
    config = augment_lib.AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    images, labels = batch_of(batch_size=32, num_classes=7)
    batch = {"image": tf.constant(images), "label": tf.one_hot(labels, 7), "index": tf.range(32)}
    seed = tf.constant([5, 6], tf.int64)
    mixed = augment_lib.mixup_cutmix_per_chunk(batch, seed, config, num_chunks=8, first_chunk=8)
    np.testing.assert_array_equal(mixed["index"], np.arange(32))
    lams, kinds = [], set()
    for chunk in range(8):
        rows = slice(4 * chunk, 4 * chunk + 4)
        use_cutmix, lam, box = (value.numpy() for value in augment_lib.mix_params(
            tf.random.experimental.stateless_fold_in(seed, 8 + chunk), config, 10, 14))
        expected_images, expected_targets = numpy_mix(images[rows], labels[rows], 7,
                                                      use_cutmix, lam, box, 0.1)
        np.testing.assert_allclose(mixed["image"][rows], expected_images, atol=1e-6)
        np.testing.assert_allclose(mixed["label"][rows], expected_targets, atol=1e-6)
        lams.append(float(lam))
        kinds.add(bool(use_cutmix))
    assert len(set(lams)) == 8 and kinds == {False, True}
    # Process 2 of 4 with 4 devices each holds the chunks of devices 8..11.
    transform, = augment_lib.batch_transforms(config, local_device_count=4, process_index=2)
    half = {key: value[:16] for key, value in batch.items()}
    expected = augment_lib.mixup_cutmix_per_chunk(half, seed, config, num_chunks=4,
                                                  first_chunk=8)
    for key, value in transform(half, seed).items():
        np.testing.assert_array_equal(value, expected[key])
    np.testing.assert_allclose(transform(half, seed)["label"], mixed["label"][:16], atol=1e-6)


# Random erasing.

def numpy_erase(images, windows, noises):
    erased = images.copy()
    for image, (top, left, height, width), noise in zip(erased, windows, noises):
        image[top:top + height, left:left + width] = noise
    return erased


def test_random_erasing_inside_tf_data_matches_numpy_reference():
    images, _ = batch_of(batch_size=16, height=20, width=24)
    seeds = np.array([[1, 2], [3, 4]], np.int64)
    dataset = tf.data.Dataset.from_tensor_slices(seeds).map(
        lambda seed: augment_lib.random_erasing({"image": tf.constant(images)}, seed, 0.5))
    erased_count = 0
    for seed, batch in zip(seeds, dataset.as_numpy_iterator()):
        windows, noise_seeds = augment_lib.random_erasing_params(tf.constant(seed), 16, 20, 24,
                                                                 0.5)
        windows = windows.numpy()
        noises = [tf.random.stateless_uniform([height, width, 3], noise_seed).numpy()
                  for (_, _, height, width), noise_seed in zip(windows, noise_seeds)]
        np.testing.assert_array_equal(batch["image"], numpy_erase(images, windows, noises))
        top, left, height, width = windows.T
        assert np.all((top >= 0) & (left >= 0) & (top + height <= 20) & (left + width <= 24))
        erased_count += np.sum(height * width > 0)
        assert batch["image"].min() >= 0.0 and batch["image"].max() < 1.0
    assert 4 <= erased_count <= 28


@pytest.mark.parametrize("height,width,probability", [(24, 40, 0.25), (4, 5, 1.0)])
def test_random_erasing_windows_distribution_matches_timm(height, width, probability):
    """Erase rate, area, aspect and position against timm's RandomErasing (constant mode on an
    image of ones, so that the erased box reads off as zeros). On the 4 x 5 image many
    attempts do not fit (a window must be strictly smaller than the image)."""
    _, _, random_erasing = timm_data()
    import torch

    count = 3000
    windows, _ = augment_lib.random_erasing_params(tf.constant([9, 9], tf.int64), count,
                                                   height, width, probability)
    ours = windows.numpy().astype(np.float64)
    assert np.all((ours[:, 2] < height) & (ours[:, 3] < width))
    ours = ours[ours[:, 2] * ours[:, 3] > 0]
    eraser = random_erasing.RandomErasing(probability, mode="const", device="cpu")
    torch.manual_seed(0)
    random.seed(0)  # timm draws from Python's global generator.
    theirs = []
    for _ in range(count):
        zeros = eraser(torch.ones(3, height, width))[0].numpy() == 0
        if zeros.any():
            rows, cols = np.nonzero(zeros.any(axis=1))[0], np.nonzero(zeros.any(axis=0))[0]
            theirs.append([rows[0], cols[0], len(rows), len(cols)])
    theirs = np.array(theirs, np.float64)
    rate = (len(ours) + len(theirs)) / (2 * count)
    assert abs(len(ours) - len(theirs)) / count < 4 * math.sqrt(2 * rate * (1 - rate) / count)
    for statistic in (lambda w: w[:, 2] * w[:, 3] / (height * width),
                      lambda w: np.log(w[:, 2] / w[:, 3]),
                      lambda w: (w[:, 0] + w[:, 2] / 2) / height,
                      lambda w: (w[:, 1] + w[:, 3] / 2) / width):
        ours_stat, theirs_stat = statistic(ours), statistic(theirs)
        standard_error = math.hypot(ours_stat.std() / math.sqrt(len(ours)),
                                    theirs_stat.std() / math.sqrt(len(theirs)))
        assert abs(ours_stat.mean() - theirs_stat.mean()) < 4 * standard_error


# The pipeline with the recipe's augmentations.

@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder(DIGITS, data_dir=data_dir).download_and_prepare()
    return data_dir


def digits_train(digits_dir, **kwargs):
    """A quarter of the train split: 11 steps an epoch."""
    kwargs = {"global_batch_size": 32, "image_size": 16, "seed": 0, "augment": PER_PROCESS,
              "train_fraction": 0.25} | kwargs
    return sampler_batches(DIGITS, digits_dir, **kwargs)


PER_PROCESS = VIT_RECIPE | {"mix_per_device": False}


def test_pipeline_with_vit_recipe_is_soft_deterministic_and_resumes(digits_dir):
    """One mixing draw per process batch (mix_per_device=False)."""
    builder = tfds.builder(DIGITS, data_dir=digits_dir)
    labels_by_index = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1))["label"]
    steps_per_epoch = round(0.25 * 1437) // 32
    fresh = list(itertools.islice(digits_train(digits_dir), steps_per_epoch + 2))
    smoothing, num_classes = 0.1, 10
    for batch in fresh:
        assert batch["label"].shape == (32, 10) and batch["label"].dtype == np.float32
        assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
        np.testing.assert_allclose(batch["label"].sum(axis=1), 1.0, atol=1e-6)
        # The targets are the smoothed labels of each row and its mirror, one lambda a batch.
        hard = labels_by_index[batch["index"]]
        smoothed = np.full((32, 10), smoothing / num_classes)
        smoothed[np.arange(32), hard] += 1.0 - smoothing
        differ = np.nonzero(hard != hard[::-1])[0]
        row = differ[0]
        lam = (batch["label"][row, hard[row]] - smoothed[::-1][row, hard[row]]) / (
            1.0 - smoothing)
        np.testing.assert_allclose(batch["label"], smoothed * lam + smoothed[::-1] * (1 - lam),
                                   atol=1e-5)
    plain = next(digits_train(digits_dir, augment={}))
    np.testing.assert_array_equal(plain["index"], fresh[0]["index"])
    assert plain["label"].dtype == np.int32
    assert np.abs(plain["image"] - fresh[0]["image"]).max() > 0.1
    for start_step in (3, steps_per_epoch + 1):
        resumed = list(itertools.islice(digits_train(digits_dir, start_step=start_step), 1))
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(resumed[0][key], fresh[start_step][key])


def assert_mix_of_mirrored_rows(mixed, targets, images, labels, smoothing, num_classes):
    """`mixed`, `targets` are a mixup or cutmix of `images` (and smoothed one-hot `labels`)
    with their mirrored rows at one lambda, which is returned."""
    smoothed = np.full((len(labels), num_classes), smoothing / num_classes)
    smoothed[np.arange(len(labels)), labels] += 1.0 - smoothing
    row = np.nonzero(labels != labels[::-1])[0][0]
    lam = (targets[row, labels[row]] - smoothed[::-1][row, labels[row]]) / (1.0 - smoothing)
    np.testing.assert_allclose(targets, smoothed * lam + smoothed[::-1] * (1 - lam), atol=1e-5)
    mirrored = images[::-1]
    if np.allclose(mixed, images * lam + mirrored * (1 - lam), atol=1e-5):
        return lam
    # Cutmix: every pixel of every row is its own or its mirror's, the box holds the others.
    own = np.all(mixed == images, axis=(0, 3))
    assert np.all(own | np.all(mixed == mirrored, axis=(0, 3)))
    rows, cols = np.nonzero(~own)
    height, width = own.shape
    box_area = round((1 - lam) * height * width)
    assert abs((1 - lam) * height * width - box_area) < 1e-3  # lam from float32 targets
    if len(rows):
        assert (np.ptp(rows) + 1) * (np.ptp(cols) + 1) <= box_area
    return lam


def test_pipeline_mixes_per_device_and_resumes(digits_dir):
    """The default on a process with 8 devices: each device's 8 rows of the batch of 64 are a
    mix of their own examples with their own lambda; a resumed run gives the same batches."""
    mixing = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}
    config = {"global_batch_size": 64, "local_device_count": 8}
    fresh = list(itertools.islice(digits_train(digits_dir, augment=mixing, **config), 3))
    plain = list(itertools.islice(digits_train(digits_dir, augment={}, **config), 3))
    for batch, unmixed in zip(fresh, plain):
        np.testing.assert_array_equal(batch["index"], unmixed["index"])
        lams = [assert_mix_of_mirrored_rows(batch["image"][rows], batch["label"][rows],
                                            unmixed["image"][rows], unmixed["label"][rows],
                                            0.1, 10)
                for rows in (slice(8 * chunk, 8 * chunk + 8) for chunk in range(8))]
        assert len(set(np.round(lams, 6))) >= 6
    resumed = next(digits_train(digits_dir, augment=mixing, start_step=2, **config))
    for key in ("image", "label", "index"):
        np.testing.assert_array_equal(resumed[key], fresh[2][key])
    with pytest.raises(ConfigError, match="does not split over 8 devices"):
        digits_train(digits_dir, augment=mixing, global_batch_size=36, local_device_count=8)
