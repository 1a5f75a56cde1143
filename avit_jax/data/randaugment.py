"""RandAugment with timm's semantics (`rand-m9-mstd0.5-inc1`) as stateless TensorFlow ops.

Every op takes and returns uint8 [H, W, 3] and follows the PIL operation timm calls
(ImageOps / ImageEnhance / Image.transform), so the tests compare each op with PIL. One
deliberate difference: the geometric ops (Rotate, Shear*, Translate*Rel) sample bilinearly
(TF has no bicubic affine resampler); timm with DeiT's settings uses bicubic there.

Per image: `num_layers` ops drawn uniformly with replacement; each applied with probability
0.5 at magnitude ~ N(m, mstd) clipped to [0, mmax]; signed ops flip their sign with p 0.5.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import tensorflow as tf

_LEVEL_DENOM = 10.0


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """Parsed timm config string, e.g. 'rand-m9-mstd0.5-inc1'."""
  magnitude: float = 10.0
  num_layers: int = 2
  magnitude_std: float = 0.0
  magnitude_max: float = _LEVEL_DENOM
  increasing: bool = False
  prob: float = 0.5

  @property
  def op_names(self) -> tuple[str, ...]:
    return INCREASING_OPS if self.increasing else OPS


def parse(config_str: str) -> RandAugmentSpec:
  """timm's `rand_augment_transform` string: 'rand' then '-'-separated m, n, mstd, mmax, inc, p."""
  parts = config_str.split('-')
  if parts[0] != 'rand':
    raise ValueError(f'aug.randaug must look like "rand-m9-mstd0.5-inc1" (timm syntax) or be "" '
                     f'for off, got {config_str!r}')
  fields = {}
  for part in parts[1:]:
    match = re.fullmatch(r'([a-z]+)(\d.*)', part)
    if not match or match.group(1) not in ('m', 'n', 'mstd', 'mmax', 'inc', 'p'):
      raise ValueError(f'Unknown section {part!r} in aug.randaug={config_str!r}; allowed: m<int> '
                       'magnitude, n<int> layers, mstd<float>, mmax<int>, inc<0|1>, p<float>')
    fields[match.group(1)] = match.group(2)
  mstd = float(fields.get('mstd', 0.0))
  return RandAugmentSpec(
      magnitude=float(fields.get('m', _LEVEL_DENOM)),
      num_layers=int(fields.get('n', 2)),
      magnitude_std=math.inf if mstd > 100 else mstd,  # timm: mstd > 100 means uniform in [0, m]
      magnitude_max=float(fields.get('mmax', _LEVEL_DENOM)),
      increasing=bool(int(fields.get('inc', 0))),
      prob=float(fields.get('p', 0.5)))


# --- Ops on uint8 [H, W, 3], each matching the PIL call timm makes. ---------------------------

def _lut(image: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
  """Applies a 256-entry lookup table (same for every channel)."""
  return tf.gather(tf.cast(tf.clip_by_value(table, 0, 255), tf.uint8), tf.cast(image, tf.int32))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, int32 [H, W]."""
  rgb = tf.cast(image, tf.int32)
  return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) // 65536


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL Image.blend(degenerate, image, factor): truncates after clipping to [0, 255]."""
  degenerate = tf.cast(degenerate, tf.float32)
  out = degenerate + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  """ImageOps.solarize: pixels >= threshold are inverted."""
  return tf.where(tf.cast(image, tf.int32) >= tf.cast(threshold, tf.int32), 255 - image, image)


def solarize_add(image: tf.Tensor, addition: tf.Tensor, threshold: int = 128) -> tf.Tensor:
  """timm solarize_add: pixels below threshold get + addition (saturating)."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, tf.minimum(x + tf.cast(addition, tf.int32), 255), x),
                 tf.uint8)


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """ImageOps.posterize: keep the top `bits` bits (0 bits -> black)."""
  shift = 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = tf.bitwise.invert(tf.bitwise.left_shift(1, shift) - 1)
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """ImageOps.autocontrast (cutoff 0): stretch each channel's [min, max] to [0, 255]."""
  x = tf.cast(image, tf.float64)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  # PIL: int(ix * scale + offset), offset = -lo * scale, in double precision.
  out = tf.clip_by_value(tf.floor(x * scale + (-lo * scale)), 0.0, 255.0)
  return tf.cast(tf.where(hi > lo, out, x), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """ImageOps.equalize, per channel, with PIL's step and rounding."""
  channels = []
  for c in range(3):
    x = tf.cast(image[..., c], tf.int32)
    hist = tf.math.bincount(tf.reshape(x, [-1]), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(x))  # count of the highest value present
    step = (tf.reduce_sum(hist) - last) // 256
    cum = tf.cumsum(hist, exclusive=True)
    table = (step // 2 + cum) // tf.maximum(step, 1)
    lut = tf.where(step > 0, table, tf.range(256))
    channels.append(_lut(x, lut))
  return tf.stack(channels, axis=-1)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Color: blend with the grayscale image."""
  gray = tf.cast(_grayscale(image), tf.uint8)
  return _blend(tf.stack([gray] * 3, axis=-1), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Contrast: blend with a flat image at the rounded grayscale mean."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_grayscale(image), tf.float64)) + 0.5)
  return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.float32)), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Brightness: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (borders left unfiltered)."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.clip_by_value(tf.round(smooth), 0.0, 255.0)
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  inner = tf.pad(tf.ones([h - 2, w - 2, 1], tf.bool), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(inner, degenerate, tf.cast(image, tf.float32))
  return _blend(degenerate, image, factor)


def pil_affine(image: tf.Tensor, matrix, fill) -> tf.Tensor:
  """Image.transform(size, AFFINE, matrix, BILINEAR, fillcolor=fill) in PIL's conventions.

  Output pixel (x, y) samples input (a (x+.5) + b (y+.5) + c, d (x+.5) + e (y+.5) + f) in
  continuous coordinates; points outside [0, W) x [0, H) take `fill` (uint8 [3]), inside
  ones interpolate with edge clamping, as PIL does.
  """
  a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in matrix]
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  # TF samples at pixel-index coordinates: index = continuous - 0.5.
  transform = tf.stack([a, b, c + 0.5 * (a + b) - 0.5, d, e, f + 0.5 * (d + e) - 0.5,
                        0.0, 0.0])[None]
  sampled = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None], transforms=transform,
      output_shape=tf.stack([h, w]), fill_value=0.0, interpolation='BILINEAR',
      fill_mode='NEAREST')[0]
  ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32) + 0.5, tf.range(w, dtype=tf.float32) + 0.5,
                       indexing='ij')
  u = a * xs + b * ys + c
  v = d * xs + e * ys + f
  inside = (u >= 0) & (u < tf.cast(w, tf.float32)) & (v >= 0) & (v < tf.cast(h, tf.float32))
  fill = tf.cast(tf.reshape(fill, [1, 1, 3]), tf.float32)
  out = tf.where(inside[..., None], tf.floor(sampled), fill)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def rotate(image: tf.Tensor, degrees: tf.Tensor, fill) -> tf.Tensor:
  """Image.rotate(degrees): counter-clockwise about the centre, same size."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = w / 2.0, h / 2.0
  # PIL: output -> input is a rotation by -degrees about (cx, cy).
  c = cos * -cx + sin * -cy + cx
  f = -sin * -cx + cos * -cy + cy
  return pil_affine(image, (cos, sin, c, -sin, cos, f), fill)


def shear_x(image, factor, fill):
  return pil_affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image, factor, fill):
  return pil_affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x_rel(image, fraction, fill):
  pixels = tf.cast(fraction, tf.float32) * tf.cast(tf.shape(image)[1], tf.float32)
  return pil_affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y_rel(image, fraction, fill):
  pixels = tf.cast(fraction, tf.float32) * tf.cast(tf.shape(image)[0], tf.float32)
  return pil_affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


# --- Magnitude (0..10) -> op argument, as timm's *_level_to_arg. ------------------------------

def _signed(value, negate):
  return tf.where(negate, -value, value)


def level_to_arg(name: str, level: tf.Tensor, negate: tf.Tensor) -> tf.Tensor | None:
  """timm LEVEL_TO_ARG[name](level); `negate` is timm's coin for signed ops."""
  frac = tf.cast(level, tf.float32) / _LEVEL_DENOM
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return None
  if name == 'Rotate':
    return _signed(frac * 30.0, negate)
  if name in ('ShearX', 'ShearY'):
    return _signed(frac * 0.3, negate)
  if name in ('TranslateXRel', 'TranslateYRel'):
    return _signed(frac * 0.45, negate)
  if name == 'Posterize':
    return tf.cast(tf.floor(frac * 4.0), tf.int32)
  if name == 'PosterizeIncreasing':
    return 4 - tf.cast(tf.floor(frac * 4.0), tf.int32)
  if name == 'Solarize':
    return tf.cast(tf.floor(frac * 256.0), tf.int32)
  if name == 'SolarizeIncreasing':
    return 256 - tf.cast(tf.floor(frac * 256.0), tf.int32)
  if name == 'SolarizeAdd':
    return tf.cast(tf.floor(frac * 110.0), tf.int32)
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return frac * 1.8 + 0.1
  if name.endswith('Increasing'):  # ColorIncreasing etc.: 1 +- 0.9 frac, at least 0.1
    return tf.maximum(0.1, 1.0 + _signed(frac * 0.9, negate))
  raise KeyError(name)


_NO_ARG = {'AutoContrast': auto_contrast, 'Equalize': equalize, 'Invert': invert}
_WITH_ARG = {
    'Posterize': posterize, 'PosterizeIncreasing': posterize,
    'Solarize': solarize, 'SolarizeIncreasing': solarize, 'SolarizeAdd': solarize_add,
    'Color': color, 'ColorIncreasing': color, 'Contrast': contrast,
    'ContrastIncreasing': contrast, 'Brightness': brightness,
    'BrightnessIncreasing': brightness, 'Sharpness': sharpness,
    'SharpnessIncreasing': sharpness,
}
_WITH_FILL = {'Rotate': rotate, 'ShearX': shear_x, 'ShearY': shear_y,
              'TranslateXRel': translate_x_rel, 'TranslateYRel': translate_y_rel}

OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
       'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
       'TranslateYRel')
INCREASING_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                  'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
                  'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
                  'TranslateXRel', 'TranslateYRel')


def apply_op(name: str, image: tf.Tensor, level: tf.Tensor, negate: tf.Tensor, fill) -> tf.Tensor:
  """One named op at magnitude `level` (0..10); uint8 [H, W, 3] -> uint8 [H, W, 3]."""
  if name in _NO_ARG:
    return _NO_ARG[name](image)
  arg = level_to_arg(name, level, negate)
  if name in _WITH_FILL:
    return _WITH_FILL[name](image, arg, fill)
  return _WITH_ARG[name](image, arg)


def sample_magnitude(spec: RandAugmentSpec, seed: tf.Tensor) -> tf.Tensor:
  """timm AugmentOp: m, N(m, mstd) or U(0, m) for mstd = inf, clipped to [0, mmax]."""
  if spec.magnitude_std == math.inf:
    level = tf.random.stateless_uniform([], seed, 0.0, spec.magnitude)
  elif spec.magnitude_std > 0:
    level = spec.magnitude + spec.magnitude_std * tf.random.stateless_normal([], seed)
  else:
    level = tf.constant(spec.magnitude, tf.float32)
  return tf.clip_by_value(level, 0.0, spec.magnitude_max)


def rand_augment(image: tf.Tensor, seed: tf.Tensor, spec: RandAugmentSpec, fill) -> tf.Tensor:
  """uint8 [H, W, 3] -> uint8 [H, W, 3]; stateless in `seed` (int [2]); fill: uint8 [3]."""
  names = spec.op_names
  layer_seeds = tf.random.experimental.stateless_split(seed, spec.num_layers)

  def layer(i, image):
    # A while loop rather than a Python loop: the 15 op branches are traced once, not per layer.
    op_seed, coin_seed, level_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seeds[i], 4))
    op = tf.random.stateless_uniform([], op_seed, 0, len(names), dtype=tf.int32)
    # timm skips the op when random() > prob.
    apply = tf.random.stateless_uniform([], coin_seed) <= spec.prob
    level = sample_magnitude(spec, level_seed)
    negate = tf.random.stateless_uniform([], sign_seed) > 0.5
    branches = [functools.partial(apply_op, n, image, level, negate, fill) for n in names]
    image = tf.cond(apply, lambda: tf.switch_case(op, branches), lambda: image)
    return i + 1, tf.ensure_shape(image, [None, None, 3])

  image = tf.ensure_shape(image, [None, None, 3])
  _, image = tf.while_loop(lambda i, _: i < spec.num_layers, layer, (tf.constant(0), image))
  return image
