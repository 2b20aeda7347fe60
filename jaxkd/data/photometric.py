"""MoCo v2's photometric augmentations (SEED's recipe), as torchvision applies them to PIL images.

`RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)`, `RandomGrayscale(p=0.2)` and
`RandomApply([GaussianBlur(sigma in [0.1, 2.0])], p=0.5)` on float [0, 1] images, computed on
the 0..255 grid as PIL computes them: brightness, contrast and saturation are PIL's
ImageEnhance blends (shared with RandAugment), the hue shift goes through PIL's own uint8 HSV
round trip (its float arithmetic reproduced), grey-scale is PIL's luma, and the four jitter
ops run in a random order as ColorJitter draws it. The blur is a separable Gaussian of the
drawn sigma with edge extension; PIL approximates the Gaussian with three box blurs, so the
blur alone is close to PIL's (about a level on average), not equal.
"""

from __future__ import annotations

import math

import tensorflow as tf

from jaxkd.data.randaugment import pil_blend, pil_luma, pil_mean_luma

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _to_levels(image: tf.Tensor) -> tf.Tensor:
    return tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0)


def _f64(t: tf.Tensor) -> tf.Tensor:
    return tf.cast(t, tf.float64)


def rgb_to_hsv(levels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """PIL's RGB -> HSV (uint8 channels as float32 levels), with its float/double steps."""
    r, g, b = tf.unstack(levels, axis=-1)
    maxc = tf.maximum(r, tf.maximum(g, b))
    minc = tf.minimum(r, tf.minimum(g, b))
    spread = maxc - minc
    grey = spread == 0
    safe_spread = tf.where(grey, 1.0, spread)
    saturation = spread / tf.where(maxc > 0, maxc, 1.0)
    rc, gc, bc = ((maxc - c) / safe_spread for c in (r, g, b))
    hue = tf.where(r == maxc, bc - gc, tf.where(
        g == maxc, tf.cast(2.0 + _f64(rc) - _f64(bc), tf.float32),
        tf.cast(4.0 + _f64(gc) - _f64(rc), tf.float32)))
    hue = tf.cast(tf.math.floormod(_f64(hue) / 6.0 + 1.0, 1.0), tf.float32)

    def level(t):
        return tf.cast(tf.clip_by_value(tf.floor(_f64(t) * 255.0), 0.0, 255.0), tf.float32)

    return (tf.where(grey, 0.0, level(hue)), tf.where(grey, 0.0, level(saturation)), maxc)


def hsv_to_rgb(hue: tf.Tensor, saturation: tf.Tensor, value: tf.Tensor) -> tf.Tensor:
    """PIL's HSV -> RGB on uint8 levels (float32)."""
    sector = tf.floor(hue * 6.0 / 255.0)
    fraction = hue * 6.0 / 255.0 - sector
    s = saturation / 255.0
    p, q, t = (tf.clip_by_value(tf.round(value * (1.0 - s * k)), 0.0, 255.0)
               for k in (1.0, fraction, 1.0 - fraction))
    sector = tf.cast(sector, tf.int32) % 6
    channels = []
    for options in ((value, q, p, p, t, value), (t, value, value, q, p, p),
                    (p, p, t, value, value, q)):
        channel = tf.gather(tf.stack(options, axis=-1), sector[..., None],
                            batch_dims=sector.shape.rank)[..., 0]
        channels.append(tf.where(saturation == 0, value, channel))
    return tf.stack(channels, axis=-1)


def adjust_hue(levels: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """torchvision's PIL adjust_hue: the uint8 hue plus trunc(factor * 255), wrapping."""
    hue, saturation, value = rgb_to_hsv(levels)
    shift = tf.cast(tf.cast(tf.cast(factor, tf.float32) * 255.0, tf.int32), tf.float32)
    return hsv_to_rgb(tf.math.floormod(hue + shift, 256.0), saturation, value)


def grey_rgb(levels: tf.Tensor) -> tf.Tensor:
    """PIL's convert('L') repeated over three channels (RandomGrayscale, ImageEnhance.Color)."""
    return tf.repeat(pil_luma(levels)[..., None], 3, axis=-1)


def jitter_op(name: str, levels: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    if name == "brightness":
        return pil_blend(tf.zeros_like(levels), levels, factor)
    if name == "contrast":
        return pil_blend(pil_mean_luma(levels), levels, factor)
    if name == "saturation":
        return pil_blend(grey_rgb(levels), levels, factor)
    if name == "hue":
        return adjust_hue(levels, factor)
    raise ValueError(f"unknown jitter op {name!r}")


def colour_jitter_draws(seed: tf.Tensor, strength) -> tuple[tf.Tensor, tf.Tensor]:
    """(factors [4], order [4]) as ColorJitter.get_params: brightness, contrast, saturation
    uniform in [max(0, 1 - x), 1 + x], hue uniform in [-x, x], the ops in a random order."""
    factor_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    u = tf.random.stateless_uniform([4], factor_seed)
    low = tf.constant([max(0.0, 1.0 - x) for x in strength[:3]] + [-strength[3]])
    high = tf.constant([1.0 + x for x in strength[:3]] + [strength[3]])
    order = tf.argsort(tf.random.stateless_uniform([4], order_seed))
    return low + u * (high - low), order


def colour_jitter(image: tf.Tensor, seed: tf.Tensor, strength) -> tf.Tensor:
    """ColorJitter(*strength) on a float [0, 1] image; the result is on the 1/255 grid."""
    factors, order = colour_jitter_draws(seed, strength)
    levels = _to_levels(image)
    for position in range(len(JITTER_OPS)):
        op = order[position]
        levels = tf.switch_case(op, [
            lambda i=i, name=name, levels=levels: jitter_op(name, levels, factors[i])
            for i, name in enumerate(JITTER_OPS)])
    return tf.ensure_shape(levels / 255.0, image.shape)


def grayscale(image: tf.Tensor) -> tf.Tensor:
    return tf.ensure_shape(grey_rgb(_to_levels(image)) / 255.0, image.shape)


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, max_sigma: float) -> tf.Tensor:
    """A separable Gaussian blur of std `sigma` (pixels) with the edge pixels extended, as
    PIL's blur extends them; the kernel spans 3 max_sigma each side."""
    radius = math.ceil(3.0 * max_sigma)
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    weights = tf.exp(-0.5 * tf.square(offsets / tf.maximum(sigma, 1e-3)))
    weights = weights / tf.reduce_sum(weights)

    def blur(x, axis):
        size = tf.shape(x)[axis]
        index = tf.clip_by_value(tf.range(size)[:, None] + tf.range(-radius, radius + 1)[None],
                                 0, size - 1)  # [size, taps]: edge pixels repeat
        taps = tf.gather(x, index, axis=axis)  # the taps axis right after `axis`
        shape = [1] * (x.shape.rank + 1)
        shape[axis + 1] = 2 * radius + 1
        return tf.reduce_sum(taps * tf.reshape(weights, shape), axis=axis + 1)

    return tf.ensure_shape(blur(blur(image, 0), 1), image.shape)


def random_apply(probability: float, transform, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """torchvision's RandomApply / RandomGrayscale: `transform(image, seed)` with
    `probability`, else the image."""
    apply_seed, transform_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    return tf.cond(tf.random.stateless_uniform([], apply_seed) < probability,
                   lambda: transform(image, transform_seed), lambda: image)
