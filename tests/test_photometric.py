"""MoCo v2's photometric augmentations (jaxkd.data.photometric) against PIL and torchvision's
PIL functions: brightness, contrast, saturation, hue and grey-scale to the level, the blur
close to PIL's, the jitter's draws and order, and the pipeline options."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFilter
from sklearn.datasets import load_sample_image

from jaxkd.data import augment as augment_lib
from jaxkd.data import photometric


def _photo(size=(48, 64)):
    """A real photo (scikit-learn's china.jpg), shrunk: smooth regions, edges and greys."""
    return np.array(Image.fromarray(load_sample_image("china.jpg")).resize(size[::-1]))


def _torchvision_pil():
    from jaxkd.convert.timm_import import import_timm

    import_timm()  # registers the schemas torchvision's import needs on CPU torch
    from torchvision.transforms import functional

    return functional


def _ours(name, photo, factor):
    return photometric.jitter_op(name, tf.constant(photo, tf.float32), tf.constant(factor)).numpy()


@pytest.mark.parametrize("name,factor", [("brightness", 0.63), ("brightness", 1.37),
                                         ("contrast", 0.71), ("contrast", 1.29),
                                         ("saturation", 0.6), ("saturation", 1.4),
                                         ("hue", 0.07), ("hue", -0.093), ("hue", 0.0)])
def test_jitter_ops_equal_torchvision_on_pil_images(name, factor):
    functional = _torchvision_pil()
    photo = _photo()
    photo[:3] = 128  # grey rows: hue and saturation leave them
    adjust = {"brightness": functional.adjust_brightness, "contrast": functional.adjust_contrast,
              "saturation": functional.adjust_saturation, "hue": functional.adjust_hue}[name]
    theirs = np.asarray(adjust(Image.fromarray(photo), factor))
    np.testing.assert_array_equal(_ours(name, photo, factor), theirs)


def test_hsv_round_trip_is_pils():
    rng = np.random.RandomState(0)
    levels = rng.randint(0, 256, (40, 40, 3)).astype(np.uint8)
    levels[:2] = 77
    hsv = np.stack([c.numpy() for c in photometric.rgb_to_hsv(tf.constant(levels, tf.float32))],
                   axis=-1)
    np.testing.assert_array_equal(hsv, np.asarray(Image.fromarray(levels).convert("HSV")))
    pil_hsv = np.asarray(Image.fromarray(levels).convert("HSV"))
    rgb = photometric.hsv_to_rgb(*(tf.constant(pil_hsv[..., k], tf.float32) for k in range(3)))
    np.testing.assert_array_equal(rgb.numpy(),
                                  np.asarray(Image.fromarray(pil_hsv, "HSV").convert("RGB")))


def test_grayscale_is_pils_luma_on_three_channels():
    photo = _photo()
    ours = photometric.grayscale(tf.constant(photo / 255.0, tf.float32)).numpy() * 255.0
    theirs = np.asarray(Image.fromarray(photo).convert("L"), np.float32)
    np.testing.assert_allclose(ours, np.repeat(theirs[..., None], 3, axis=-1), atol=1e-3)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0])
def test_blur_is_close_to_pils_gaussian_blur(sigma):
    """PIL approximates the Gaussian with box blurs: under a level apart on average (at
    sigma 0.3 PIL's boxes blur more than the Gaussian, as much as the Gaussian itself does)."""
    photo = _photo()
    ours = photometric.gaussian_blur(tf.constant(photo / 255.0, tf.float32),
                                     tf.constant(sigma), 2.0).numpy() * 255.0
    theirs = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(sigma)),
                        np.float32)
    unblurred = np.abs(photo.astype(np.float32) - theirs).mean()
    difference = np.abs(ours - theirs).mean()
    assert difference < 1.0, (difference, unblurred)
    if sigma >= 0.5:
        assert difference < 0.25 * unblurred, (difference, unblurred)


def test_colour_jitter_draws_like_color_jitter_get_params():
    draws = [photometric.colour_jitter_draws(tf.constant([5, i], tf.int64), (0.4, 0.4, 0.4, 0.1))
             for i in range(400)]
    factors = np.stack([f.numpy() for f, _ in draws])
    orders = np.stack([o.numpy() for _, o in draws])
    assert np.all(factors[:, :3] >= 0.6) and np.all(factors[:, :3] <= 1.4)
    assert np.all(np.abs(factors[:, 3]) <= 0.1)
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert len({tuple(o) for o in orders}) == 24  # every order of the four ops occurs
    photo = tf.constant(_photo() / 255.0, tf.float32)
    jittered = photometric.colour_jitter(photo, tf.constant([1, 2], tf.int64),
                                         (0.4, 0.4, 0.4, 0.1)).numpy()
    factors, order = photometric.colour_jitter_draws(tf.constant([1, 2], tf.int64),
                                                     (0.4, 0.4, 0.4, 0.1))
    expected = tf.round(photo * 255.0)
    for op in order.numpy():
        expected = photometric.jitter_op(photometric.JITTER_OPS[op], expected, factors[op])
    np.testing.assert_array_equal(jittered, expected.numpy() / 255.0)


def test_pipeline_options_apply_with_their_probabilities():
    config = augment_lib.AugmentConfig(random_resized_crop=False, flip=False,
                                       grayscale_prob=0.5)
    transforms = augment_lib.example_transforms(config, 48)
    photo = tf.constant(_photo((48, 48)) / 255.0, tf.float32)
    outputs = [augment_lib.apply_example_transforms(photo, tf.constant([0, i], tf.int64),
                                                    transforms).numpy() for i in range(200)]
    grey = [np.allclose(o[..., 0], o[..., 1]) and np.allclose(o[..., 1], o[..., 2])
            for o in outputs]
    assert 70 < sum(grey) < 130
    moco = augment_lib.AugmentConfig(random_resized_crop=True, scale_min=0.2,
                                     colour_jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5)
    assert len(augment_lib.example_transforms(moco, 48)) == 5  # crop, 3 photometric, flip
    out = augment_lib.apply_example_transforms(photo, tf.constant([3, 4], tf.int64),
                                               augment_lib.example_transforms(moco, 48))
    assert out.shape == (48, 48, 3) and 0.0 <= float(tf.reduce_min(out)) <= 1.0
    for bad in ({"colour_jitter": (0.4, 0.4, 0.4)}, {"colour_jitter": (0.4, 0.4, 0.4, 0.7)},
                {"blur_sigma": (2.0, 0.1)}, {"grayscale_prob": 1.5}):
        with pytest.raises(ValueError):
            augment_lib.AugmentConfig(**bad)
