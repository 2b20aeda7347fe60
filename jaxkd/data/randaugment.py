"""timm's RandAugment (`rand_augment_transform`) as a tf.data per-example transform.

The ops work on uint8 levels held as float32 (the image is rounded to 1/255 steps first, as
timm's PIL images are uint8) and round or truncate their results as PIL does, so that each op
reproduces timm's PIL op. Geometric ops fill with timm's default grey 128 and interpolate
bilinearly (see jaxkd.data.augment for why).
"""

import dataclasses
import functools
import math
from typing import Any

import tensorflow as tf

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is the strongest setting.
RANDAUGMENT_FILL = 128.0  # timm's _FILL grey for pixels that geometric ops move in.
RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateXRel", "TranslateYRel")  # timm's _RAND_TRANSFORMS
RANDAUGMENT_INCREASING_OPS = tuple(  # timm's _RAND_INCREASING_TRANSFORMS
    name + "Increasing" if name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness",
                                    "Sharpness") else name
    for name in RANDAUGMENT_OPS)


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string (timm's defaults)."""

    magnitude: float = LEVEL_DENOM
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0  # inf: magnitude uniform in [0, magnitude].
    magnitude_max: float = LEVEL_DENOM
    increasing: bool = False

    @property
    def op_names(self) -> tuple[str, ...]:
        return RANDAUGMENT_INCREASING_OPS if self.increasing else RANDAUGMENT_OPS


def parse_randaugment(spec: str) -> RandAugmentSpec:
    """Parses "rand-m9-n2-p0.5-mstd0.5-mmax10-inc1" (any subset, any order) as timm does.

    timm's transform-set choice ('t...') is not supported, and unknown sections raise where
    timm skips them.
    """
    sections = spec.split("-")
    if sections[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand'")
    values: dict[str, Any] = {}
    for section in sections[1:]:
        key = next((name for name in ("mstd", "mmax", "inc", "m", "n", "p")
                    if section.startswith(name) and section[len(name):][:1].isdigit()), None)
        if key is None:
            raise ValueError(f"unknown section {section!r} in RandAugment spec {spec!r}; "
                             "known: m, n, p, mstd, mmax, inc")
        value = section[len(key):]
        if key == "mstd":
            values["magnitude_std"] = math.inf if float(value) > 100 else float(value)
        elif key == "mmax":
            values["magnitude_max"] = float(int(value))
        elif key == "inc":
            values["increasing"] = bool(int(value))
        elif key == "m":
            values["magnitude"] = float(int(value))
        elif key == "n":
            values["num_layers"] = int(value)
        else:
            values["prob"] = float(value)
    return RandAugmentSpec(**values)


def _negated(value: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return tf.where(negate, -value, value)


def _floor_level(magnitude: tf.Tensor, scale: float) -> tf.Tensor:
    """timm's int((magnitude / 10) * scale) for magnitude >= 0."""
    return tf.floor(magnitude / LEVEL_DENOM * scale)


def _enhance(magnitude: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    del negate
    return magnitude / LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing(magnitude: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    return tf.maximum(tf.constant(0.1, tf.float64),
                      1.0 + _negated(magnitude / LEVEL_DENOM * 0.9, negate))


# timm's LEVEL_TO_ARG: float64 magnitude in [0, magnitude_max] and a sign -> the op argument.
_LEVEL_TO_ARG = {
    "Rotate": lambda m, negate: _negated(m / LEVEL_DENOM * 30.0, negate),
    "Posterize": lambda m, negate: _floor_level(m, 4.0),
    "PosterizeIncreasing": lambda m, negate: 4.0 - _floor_level(m, 4.0),
    "Solarize": lambda m, negate: tf.minimum(tf.constant(256.0, tf.float64),
                                             _floor_level(m, 256.0)),
    "SolarizeIncreasing": lambda m, negate: 256.0 - tf.minimum(
        tf.constant(256.0, tf.float64), _floor_level(m, 256.0)),
    "SolarizeAdd": lambda m, negate: tf.minimum(tf.constant(128.0, tf.float64),
                                                _floor_level(m, 110.0)),
    "ShearX": lambda m, negate: _negated(m / LEVEL_DENOM * 0.3, negate),
    "ShearY": lambda m, negate: _negated(m / LEVEL_DENOM * 0.3, negate),
    "TranslateXRel": lambda m, negate: _negated(m / LEVEL_DENOM * 0.45, negate),
    "TranslateYRel": lambda m, negate: _negated(m / LEVEL_DENOM * 0.45, negate),
}
_ENHANCE_OPS = ("Color", "Contrast", "Brightness", "Sharpness")
_LEVEL_TO_ARG |= {name: _enhance for name in _ENHANCE_OPS}
_LEVEL_TO_ARG |= {name + "Increasing": _enhance_increasing for name in _ENHANCE_OPS}


def pil_blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's Image.blend(degenerate, image, factor): float32 arithmetic, clipped, truncated."""
    factor = tf.cast(factor, tf.float32)
    return tf.floor(tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0))


def pil_luma(levels: tf.Tensor) -> tf.Tensor:
    """PIL's RGB -> L conversion (fixed-point ITU-R 601-2 luma, rounded), as float32 [H, W]."""
    rgb = tf.cast(levels, tf.int32)
    luma = tf.bitwise.right_shift(
        rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000, 16)
    return tf.cast(luma, tf.float32)


def pil_mean_luma(levels: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Contrast's grey: the luma mean rounded half up (float64: the sum is exact)."""
    mean = tf.reduce_mean(tf.cast(pil_luma(levels), tf.float64))
    return tf.cast(tf.floor(mean + 0.5), tf.float32)


def _auto_contrast(levels: tf.Tensor) -> tf.Tensor:
    """ImageOps.autocontrast: each channel's [min, max] stretched to [0, 255], truncated."""
    values = tf.cast(levels, tf.float64)
    low = tf.reduce_min(values, axis=(0, 1))
    high = tf.reduce_max(values, axis=(0, 1))
    scale = 255.0 / tf.maximum(high - low, 1.0)
    stretched = tf.clip_by_value(tf.floor(values * scale - low * scale), 0.0, 255.0)
    return tf.cast(tf.where(high > low, stretched, values), tf.float32)


def _equalize(levels: tf.Tensor) -> tf.Tensor:
    """ImageOps.equalize: each channel through PIL's histogram-equalisation table."""
    channels = []
    for channel in tf.unstack(tf.cast(levels, tf.int32), axis=-1):
        histogram = tf.math.bincount(tf.reshape(channel, [-1]), minlength=256, maxlength=256)
        # PIL: step = (count - count of the highest level present) // 255.
        step = (tf.reduce_sum(histogram) - histogram[tf.reduce_max(channel)]) // 255
        table = (step // 2 + tf.cumsum(histogram, exclusive=True)) // tf.maximum(step, 1)
        table = tf.where(step > 0, tf.minimum(table, 255), tf.range(256))
        channels.append(tf.gather(table, channel))
    return tf.cast(tf.stack(channels, axis=-1), tf.float32)


def _posterize(levels: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """ImageOps.posterize: keep the top `bits` bits. 0 bits (PosterizeIncreasing at magnitude
    10), which PIL 13 rejects, gives black as older PIL's table did."""
    bits = tf.cast(bits, tf.int32)
    mask = tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - tf.minimum(bits, 8)) - 1)
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(levels, tf.int32), mask), tf.float32)


def _sharpness(levels: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (3x3, centre 5, sum 13, rounded
    half up, in integers), which leaves the one-pixel border unfiltered."""
    values = tf.cast(levels, tf.int32)
    shape = tf.shape(levels)
    total = tf.add_n([values[row:shape[0] - 2 + row, col:shape[1] - 2 + col]
                      * (5 if (row, col) == (1, 1) else 1)
                      for row in range(3) for col in range(3)])
    smooth = tf.cast((2 * total + 13) // 26, tf.float32)
    degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    rows, cols = tf.range(shape[0])[:, None], tf.range(shape[1])[None, :]
    inner = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
    return pil_blend(tf.where(inner[..., None], degenerate, levels), levels, factor)


def _affine(levels: tf.Tensor, matrix) -> tf.Tensor:
    """PIL's Image.transform(AFFINE, matrix, BILINEAR, fillcolor=grey), in float64.

    `matrix` (a, b, c, d, e, f) maps each output pixel centre (x, y) (pixel i's centre is at
    i + 0.5) to the input point (a x + b y + c, d x + e y + f); points outside the image take
    the fill, the others interpolate bilinearly between the nearest pixel centres (edge pixels
    repeated) and are truncated to a level.
    """
    a, b, c, d, e, f = matrix
    shape = tf.shape(levels)
    height, width = shape[0], shape[1]
    ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float64) + 0.5,
                         tf.range(width, dtype=tf.float64) + 0.5, indexing="ij")
    x_in = a * xs + b * ys + c
    y_in = d * xs + e * ys + f
    inside = ((x_in >= 0.0) & (x_in < tf.cast(width, tf.float64))
              & (y_in >= 0.0) & (y_in < tf.cast(height, tf.float64)))
    x_in, y_in = x_in - 0.5, y_in - 0.5
    x0, y0 = tf.floor(x_in), tf.floor(y_in)
    dx, dy = (x_in - x0)[..., None], (y_in - y0)[..., None]
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    columns = [tf.clip_by_value(x0 + offset, 0, width - 1) for offset in (0, 1)]
    rows = [tf.clip_by_value(y0 + offset, 0, height - 1) for offset in (0, 1)]
    pixels = tf.reshape(tf.cast(levels, tf.float64), [-1, tf.shape(levels)[2]])

    def pixel(row, column):
        return tf.gather(pixels, row * width + column)

    # PIL's order of operations: v = a + (b - a) * d along x, then along y.
    top_left, top_right = pixel(rows[0], columns[0]), pixel(rows[0], columns[1])
    bottom_left, bottom_right = pixel(rows[1], columns[0]), pixel(rows[1], columns[1])
    top = top_left + (top_right - top_left) * dx
    bottom = bottom_left + (bottom_right - bottom_left) * dx
    interpolated = tf.floor(top + (bottom - top) * dy)
    return tf.cast(tf.where(inside[..., None], interpolated, RANDAUGMENT_FILL), tf.float32)


def _rotate(levels: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """Image.rotate(degrees) about the image centre (counter-clockwise), no expansion."""
    shape = tf.cast(tf.shape(levels), tf.float64)
    center_x, center_y = shape[1] / 2.0, shape[0] / 2.0
    angle = -tf.math.floormod(degrees, 360.0) * (math.pi / 180.0)
    # PIL rounds cos and sin to 15 decimals (making e.g. sin(30 degrees) exactly 0.5).
    cos, sin = (tf.round(value * 1e15) / 1e15 for value in (tf.cos(angle), tf.sin(angle)))
    return _affine(levels, (cos, sin, cos * -center_x + sin * -center_y + center_x,
                            -sin, cos, -sin * -center_x + cos * -center_y + center_y))


def _image_width(levels: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.shape(levels)[1], tf.float64)


def _image_height(levels: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.shape(levels)[0], tf.float64)


# timm's NAME_TO_OP on levels: (image, argument) -> image.
_OPS = {
    "AutoContrast": lambda image, arg: _auto_contrast(image),
    "Equalize": lambda image, arg: _equalize(image),
    "Invert": lambda image, arg: 255.0 - image,
    "Rotate": _rotate,
    "Posterize": _posterize,
    "Solarize": lambda image, threshold: tf.where(
        image < tf.cast(threshold, tf.float32), image, 255.0 - image),
    "SolarizeAdd": lambda image, add: tf.where(
        image < 128.0, tf.minimum(image + tf.cast(add, tf.float32), 255.0), image),
    "Color": lambda image, factor: pil_blend(
        tf.tile(pil_luma(image)[..., None], [1, 1, 3]), image, factor),
    "Contrast": lambda image, factor: pil_blend(
        tf.fill(tf.shape(image), pil_mean_luma(image)), image, factor),
    "Brightness": lambda image, factor: pil_blend(tf.zeros_like(image), image, factor),
    "Sharpness": _sharpness,
    "ShearX": lambda image, shear: _affine(image, (1.0, shear, 0.0, 0.0, 1.0, 0.0)),
    "ShearY": lambda image, shear: _affine(image, (1.0, 0.0, 0.0, shear, 1.0, 0.0)),
    "TranslateXRel": lambda image, fraction: _affine(
        image, (1.0, 0.0, fraction * _image_width(image), 0.0, 1.0, 0.0)),
    "TranslateYRel": lambda image, fraction: _affine(
        image, (1.0, 0.0, 0.0, 0.0, 1.0, fraction * _image_height(image))),
}
_OPS |= {name + "Increasing": _OPS[name] for name in ("Posterize", "Solarize") + _ENHANCE_OPS}


def randaugment_op(name: str, levels: tf.Tensor, magnitude: tf.Tensor,
                   negate: tf.Tensor) -> tf.Tensor:
    """One timm RandAugment op on uint8 levels (float32 [H, W, 3] integers in [0, 255]).

    `magnitude` is the already clipped magnitude, `negate` timm's random sign of signed
    arguments (rotation, shear, translation, the 'Increasing' enhancement factors).
    """
    magnitude = tf.cast(magnitude, tf.float64)
    level_to_arg = _LEVEL_TO_ARG.get(name)
    argument = None if level_to_arg is None else level_to_arg(magnitude, negate)
    return _OPS[name](levels, argument)


def randaugment_draws(seed: tf.Tensor, spec: RandAugmentSpec) -> dict[str, tf.Tensor]:
    """The random numbers of one image's RandAugment, one entry per layer, as timm uses them.

    "op": op index, uniform with replacement (timm's np.random.choice); "apply_draw": the op
    runs when <= prob; "magnitude": before clipping to [0, magnitude_max] (float64);
    "sign_draw": a signed argument is negated when > 0.5.
    """
    op_seed, apply_seed, magnitude_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    layers = [spec.num_layers]
    if math.isinf(spec.magnitude_std):
        magnitude = tf.random.stateless_uniform(layers, magnitude_seed, maxval=spec.magnitude,
                                                dtype=tf.float64)
    else:
        magnitude = spec.magnitude + spec.magnitude_std * tf.random.stateless_normal(
            layers, magnitude_seed, dtype=tf.float64)
    return {"op": tf.random.stateless_uniform(layers, op_seed, minval=0,
                                              maxval=len(spec.op_names), dtype=tf.int32),
            "apply_draw": tf.random.stateless_uniform(layers, apply_seed),
            "magnitude": magnitude,
            "sign_draw": tf.random.stateless_uniform(layers, sign_seed)}


def rand_augment(image: tf.Tensor, seed: tf.Tensor, spec: RandAugmentSpec) -> tf.Tensor:
    """timm's RandAugment on a float [0, 1] image: `num_layers` random ops, each applied with
    probability `prob` at a noisy magnitude. The result is on the 1/255 grid."""
    draws = randaugment_draws(seed, spec)
    levels = tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0)
    for layer in range(spec.num_layers):
        levels = tf.cond(
            draws["apply_draw"][layer] <= spec.prob,
            lambda levels=levels, layer=layer: _random_op(
                levels, draws["op"][layer],
                tf.clip_by_value(draws["magnitude"][layer], 0.0, spec.magnitude_max),
                draws["sign_draw"][layer] > 0.5, spec.op_names),
            lambda levels=levels: levels)
    return tf.ensure_shape(levels / 255.0, image.shape)


@tf.function(autograph=False, reduce_retracing=True)
def _random_op(levels: tf.Tensor, op_index: tf.Tensor, magnitude: tf.Tensor,
               negate: tf.Tensor, op_names: tuple[str, ...]) -> tf.Tensor:
    """The op of index `op_index`. A tf.function: traced once per image shape and op set, not
    per layer and per pipeline (each epoch builds one), as tracing the ops takes seconds."""
    branches = [functools.partial(randaugment_op, name, levels, magnitude, negate)
                for name in op_names]
    return tf.switch_case(op_index, branches)
