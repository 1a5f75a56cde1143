"""DeiT image transforms and on-device mixup / cutmix.

Per-example ops are TensorFlow, stateless in an int [2] seed (so a batch is a function of
the data seed and step), and follow timm's definitions: RandomResizedCrop (scale 0.08-1,
log-uniform ratio 3/4-4/3, 10 tries then centre crop), horizontal flip, RandAugment
(randaugment.py), RandomErasing ('pixel' mode) and the eval resize + centre crop.
`mixup_cutmix` is pure jnp and runs in the jitted train step (timm Mixup, 'batch' mode).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import tensorflow as tf

from avit_jax.data import randaugment


def decode(data: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG / PNG / GIF / BMP / WebP -> uint8 [H, W, 3]; grayscale and CMYK become RGB."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


def random_resized_crop_box(shape: tf.Tensor, seed: tf.Tensor, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3), attempts: int = 10) -> tuple[tf.Tensor, ...]:
  """timm RandomResizedCrop.get_params on an image of `shape` [H, W, ...] -> (top, left, h, w)."""
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  area = tf.random.stateless_uniform([attempts], area_seed, scale[0], scale[1]) * height * width
  aspect = tf.exp(tf.random.stateless_uniform([attempts], ratio_seed, math.log(ratio[0]),
                                              math.log(ratio[1])))
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  ok = (w <= width) & (h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32))  # first attempt that fits, as timm's loop
  # Fallback when no attempt fits: the largest centred crop with ratio clamped to the range.
  in_ratio = width / height
  fw = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fh = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  h = tf.where(tf.reduce_any(ok), h[first], fh)
  w = tf.where(tf.reduce_any(ok), w[first], fw)
  # random.randint(0, H - h) is inclusive: floor(U * (H - h + 1)).
  top = tf.floor(tf.random.stateless_uniform([], top_seed) * (height - h + 1))
  left = tf.floor(tf.random.stateless_uniform([], left_seed) * (width - w + 1))
  top = tf.where(tf.reduce_any(ok), top, tf.floor((height - h) / 2))
  left = tf.where(tf.reduce_any(ok), left, tf.floor((width - w) / 2))
  return tuple(tf.cast(v, tf.int32) for v in (top, left, h, w))


def resize(image: tf.Tensor, height, width) -> tf.Tensor:
  """Bicubic resize with antialiasing (like PIL's), rounded back to uint8."""
  out = tf.image.resize(image, tf.stack([height, width]), method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]."""
  top, left, h, w = random_resized_crop_box(tf.shape(image), seed)
  return resize(image[top:top + h, left:left + w], size, size)


def decode_and_random_resized_crop(data: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """Encoded image -> uint8 [size, size, 3]; JPEGs decode only the crop window (faster)."""
  def jpeg():
    top, left, h, w = random_resized_crop_box(tf.image.extract_jpeg_shape(data), seed)
    return tf.image.decode_and_crop_jpeg(data, tf.stack([top, left, h, w]), channels=3,
                                         dct_method='INTEGER_ACCURATE')

  def other():
    image = decode(data)
    top, left, h, w = random_resized_crop_box(tf.shape(image), seed)
    return image[top:top + h, left:left + w]

  crop = tf.ensure_shape(tf.cond(tf.io.is_jpeg(data), jpeg, other), [None, None, 3])
  return resize(crop, size, size)


def resize_and_center_crop(image: tf.Tensor, size: int, crop_pct: float) -> tf.Tensor:
  """timm eval: shorter side to floor(size / crop_pct), then the central size x size."""
  scale_size = math.floor(size / crop_pct)
  h = tf.shape(image)[0]
  w = tf.shape(image)[1]
  short = tf.cast(tf.minimum(h, w), tf.float64)
  # torchvision Resize(int): the longer side is int(scale_size * long / short).
  new_h = tf.where(h <= w, scale_size, tf.cast(scale_size * tf.cast(h, tf.float64) / short,
                                                tf.int32))
  new_w = tf.where(w < h, scale_size, tf.cast(scale_size * tf.cast(w, tf.float64) / short,
                                               tf.int32))
  same = tf.logical_and(tf.equal(new_h, h), tf.equal(new_w, w))
  image = tf.cond(same, lambda: image, lambda: resize(image, new_h, new_w))
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
  return tf.ensure_shape(image[top:top + size, left:left + size], [size, size, 3])


def pad_and_random_crop(image: tf.Tensor, pad: int, seed: tf.Tensor) -> tf.Tensor:
  """Zero-pad `pad` pixels on every side, then a random crop of the original size."""
  h, w = image.shape[0], image.shape[1]
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  offset = tf.random.stateless_uniform([2], seed, 0, 2 * pad + 1, dtype=tf.int32)
  return padded[offset[0]:offset[0] + h, offset[1]:offset[1] + w]


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Horizontal flip with probability 0.5."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.cond(flip, lambda: image[:, ::-1], lambda: image)


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  """uint8 [H, W, 3] -> float32 (x / 255 - mean) / std."""
  x = tf.cast(image, tf.float32) / 255.0
  return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_erasing(image: tf.Tensor, seed: tf.Tensor, prob: float, area=(0.02, 1 / 3),
                   log_ratio=(math.log(0.3), math.log(1 / 0.3)), attempts: int = 10) -> tf.Tensor:
  """timm RandomErasing(mode='pixel', max_count=1) on a normalised float32 [H, W, C] image.

  With probability `prob`, a box of area U(0.02, 1/3) and log-uniform aspect (10 tries,
  box must fit strictly) is replaced by standard-normal noise.
  """
  h, w, c = image.shape
  coin, area_seed, ratio_seed, top_seed, left_seed, noise_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 6))
  target = tf.random.stateless_uniform([attempts], area_seed, area[0], area[1]) * (h * w)
  aspect = tf.exp(tf.random.stateless_uniform([attempts], ratio_seed, *log_ratio))
  eh = tf.round(tf.sqrt(target * aspect))
  ew = tf.round(tf.sqrt(target / aspect))
  ok = (ew < w) & (eh < h)
  first = tf.argmax(tf.cast(ok, tf.int32))
  eh, ew = eh[first], ew[first]
  top = tf.floor(tf.random.stateless_uniform([], top_seed) * (h - eh + 1))
  left = tf.floor(tf.random.stateless_uniform([], left_seed) * (w - ew + 1))
  rows = tf.range(h, dtype=tf.float32)[:, None]
  cols = tf.range(w, dtype=tf.float32)[None, :]
  box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
  erase = (tf.random.stateless_uniform([], coin) < prob) & tf.reduce_any(ok)
  # Noise only when erasing (1 image in 4 at p = 0.25): drawing it costs as much as the rest.
  return tf.cond(erase, lambda: tf.where(box[..., None], tf.random.stateless_normal(
      [h, w, c], noise_seed), image), lambda: image)


def rand_augment_fill(mean) -> tuple[int, int, int]:
  """timm's img_mean fill colour for RandAugment: round(255 * mean) per channel."""
  return tuple(min(255, round(255 * m)) for m in mean)


def train_preprocess(data: tf.Tensor, seed: tf.Tensor, *, encoded: bool, image_size: int,
                     aug: ml_collections.ConfigDict, mean, std) -> tf.Tensor:
  """DeiT train transform: encoded bytes or uint8 [H, W, 3] -> float32 [S, S, 3] normalised.

  Order as timm: crop (random-resized, or resize + pad-and-crop) -> flip -> RandAugment ->
  normalise -> random erasing. Each step is switched by its config.aug field.
  """
  crop_seed, pad_seed, flip_seed, ra_seed, erase_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  if aug.random_resized_crop:
    if encoded:
      image = decode_and_random_resized_crop(data, crop_seed, image_size)
    else:
      image = random_resized_crop(data, crop_seed, image_size)
  else:
    image = resize_and_center_crop(decode(data) if encoded else data, image_size, 1.0)
  if aug.pad_and_crop:
    image = pad_and_random_crop(image, int(aug.pad_and_crop), pad_seed)
  if aug.hflip:
    image = random_flip(image, flip_seed)
  if aug.randaug:
    image = randaugment.rand_augment(image, ra_seed, randaugment.parse(aug.randaug),
                                     rand_augment_fill(mean))
  x = normalize(tf.ensure_shape(image, [image_size, image_size, 3]), mean, std)
  if aug.erase_p > 0:
    x = random_erasing(x, erase_seed, float(aug.erase_p))
  return x


def eval_preprocess(data: tf.Tensor, *, encoded: bool, image_size: int, crop_pct: float, mean,
                    std) -> tf.Tensor:
  """Resize to floor(S / crop_pct), centre crop S, normalise -> float32 [S, S, 3]."""
  image = decode(data) if encoded else data
  return normalize(resize_and_center_crop(image, image_size, crop_pct), mean, std)


def mixup_cutmix(key: jax.Array, images: jax.Array, targets: jax.Array,
                 aug_config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """timm Mixup (mode 'batch', prob 1), on device, of images and their soft targets.

  images: [B, H, W, C]; targets: float32 [B, C] (e.g. losses.smooth_labels) -> (mixed images
  [B, H, W, C], mixed targets float32 [B, C]). Image i is mixed with image B-1-i (the flipped
  batch) with lam ~ Beta(alpha, alpha); cutmix (chosen with probability switch_prob when
  both are on) pastes a box of the partner and sets lam to the uncovered fraction of the
  clipped box. With mixup and cutmix off, both come back unchanged.
  """
  mixup, cutmix = float(aug_config.mixup), float(aug_config.cutmix)
  if mixup <= 0 and cutmix <= 0:
    return images, targets
  switch_key, lam_key, y_key, x_key = jax.random.split(key, 4)
  if mixup > 0 and cutmix > 0:
    use_cutmix = jax.random.uniform(switch_key) < aug_config.switch_prob
    alpha = jnp.where(use_cutmix, cutmix, mixup)
  else:
    use_cutmix = jnp.asarray(cutmix > 0)
    alpha = jnp.asarray(max(mixup, cutmix))
  lam = jax.random.beta(lam_key, alpha, alpha)
  _, height, width, _ = images.shape
  # timm rand_bbox: cut = int(side * sqrt(1 - lam)), centre uniform, box clipped to the image.
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(y_key, (), 0, height)
  cx = jax.random.randint(x_key, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  box_lam = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  partner = images[::-1]
  pasted = jnp.where(box[None, :, :, None], partner, images)
  blended = (lam * images + (1.0 - lam) * partner).astype(images.dtype)
  images = jnp.where(use_cutmix, pasted, blended)
  lam = jnp.where(use_cutmix, box_lam, lam).astype(jnp.float32)
  return images, lam * targets + (1.0 - lam) * targets[::-1]
