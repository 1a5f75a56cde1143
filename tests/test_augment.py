"""DeiT transforms, RandAugment ops (against PIL, which timm calls) and mixup / cutmix."""

import functools
import io
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from avit_jax.data import augment
from avit_jax.training import losses
from avit_jax.data import randaugment as ra

FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean


def _seed(i):
  return tf.constant([i, 7], tf.int64)


@pytest.fixture(scope='module')
def image():
  """uint8 [37, 41, 3] with gradients, edges and noise (odd sizes catch centre errors)."""
  yy, xx = np.mgrid[0:37, 0:41]
  base = np.stack([(xx * 6) % 256, (yy * 7) % 256, ((xx + yy) * 3) % 256], -1)
  noise = np.random.RandomState(0).randint(-20, 20, base.shape)
  return np.clip(base + noise, 10, 240).astype(np.uint8)


def _pil_affine(pil, matrix):
  return pil.transform(pil.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL)


# (name, ours, PIL reference); pointwise ops must match PIL exactly.
POINTWISE = [
    ('invert', ra.invert, ImageOps.invert),
    ('solarize', lambda x: ra.solarize(x, 100), lambda p: ImageOps.solarize(p, 100)),
    ('solarize_add', lambda x: ra.solarize_add(x, 60),
     lambda p: p.point([min(255, i + 60) if i < 128 else i for i in range(256)] * 3)),
    ('posterize1', lambda x: ra.posterize(x, 1), lambda p: ImageOps.posterize(p, 1)),
    ('posterize3', lambda x: ra.posterize(x, 3), lambda p: ImageOps.posterize(p, 3)),
    ('autocontrast', ra.auto_contrast, ImageOps.autocontrast),
    ('equalize', ra.equalize, ImageOps.equalize),
] + [
    (f'{name}{f}', lambda x, op=op, f=f: op(x, f),
     lambda p, cls=cls, f=f: cls(p).enhance(f))
    for name, op, cls in (('color', ra.color, ImageEnhance.Color),
                          ('contrast', ra.contrast, ImageEnhance.Contrast),
                          ('brightness', ra.brightness, ImageEnhance.Brightness),
                          ('sharpness', ra.sharpness, ImageEnhance.Sharpness))
    for f in (0.19, 1.81)
]

# Geometric ops: timm uses bicubic, we sample bilinearly; compared with PIL's bilinear.
GEOMETRIC = [
    ('rotate27', lambda x: ra.rotate(x, 27.0, FILL), lambda p: p.rotate(27.0, Image.BILINEAR,
                                                                       fillcolor=FILL)),
    ('rotate-13', lambda x: ra.rotate(x, -13.5, FILL), lambda p: p.rotate(-13.5, Image.BILINEAR,
                                                                         fillcolor=FILL)),
    ('shear_x', lambda x: ra.shear_x(x, 0.27, FILL),
     lambda p: _pil_affine(p, (1, .27, 0, 0, 1, 0))),
    ('shear_y', lambda x: ra.shear_y(x, -0.2, FILL),
     lambda p: _pil_affine(p, (1, 0, 0, -.2, 1, 0))),
    ('translate_x', lambda x: ra.translate_x_rel(x, 0.405, FILL),
     lambda p: _pil_affine(p, (1, 0, 0.405 * 41, 0, 1, 0))),
    ('translate_y', lambda x: ra.translate_y_rel(x, -0.1, FILL),
     lambda p: _pil_affine(p, (1, 0, 0, 0, 1, -0.1 * 37))),
]


@pytest.mark.parametrize('name,ours,reference', POINTWISE, ids=[p[0] for p in POINTWISE])
def test_pointwise_op_matches_pil(image, name, ours, reference):
  del name
  out = ours(tf.constant(image)).numpy()
  assert out.dtype == np.uint8 and out.shape == image.shape
  np.testing.assert_array_equal(out, np.asarray(reference(Image.fromarray(image))))


@pytest.mark.parametrize('name,ours,reference', GEOMETRIC, ids=[g[0] for g in GEOMETRIC])
def test_geometric_op_matches_pil_bilinear(image, name, ours, reference):
  del name
  out = ours(tf.constant(image)).numpy().astype(int)
  want = np.asarray(reference(Image.fromarray(image))).astype(int)
  diff = np.abs(out - want)
  assert diff.max() <= 1 and diff.mean() < 0.05  # float32 vs double coordinates
  assert (np.all(want == FILL, axis=-1) == np.all(out == FILL, axis=-1)).mean() > 0.99


def test_posterize_zero_bits_is_black(image):
  assert ra.posterize(tf.constant(image), 0).numpy().max() == 0  # timm at magnitude 10


def test_level_to_arg_at_magnitude_9():
  """timm's level functions at m = 9 (hand-computed)."""
  def arg(name, negate=False):
    return ra.level_to_arg(name, tf.constant(9.0), tf.constant(negate)).numpy()
  np.testing.assert_allclose([arg('Rotate'), arg('Rotate', True)], [27.0, -27.0], rtol=1e-6)
  np.testing.assert_allclose([arg('ShearX'), arg('ShearY', True)], [0.27, -0.27], rtol=1e-6)
  np.testing.assert_allclose(arg('TranslateXRel'), 0.405, rtol=1e-6)
  assert arg('PosterizeIncreasing') == 1 and arg('Posterize') == 3  # 4 - int(3.6), int(3.6)
  assert arg('SolarizeIncreasing') == 26 and arg('Solarize') == 230  # 256 - int(230.4)
  assert arg('SolarizeAdd') == 99  # int(99.0)
  np.testing.assert_allclose([arg('ColorIncreasing'), arg('SharpnessIncreasing', True)],
                             [1.81, 0.19], rtol=1e-6)
  np.testing.assert_allclose(arg('Contrast'), 1.72, rtol=1e-6)  # 0.9 * 1.8 + 0.1
  assert ra.level_to_arg('PosterizeIncreasing', tf.constant(10.0), tf.constant(False)) == 0
  assert ra.level_to_arg('Equalize', tf.constant(9.0), tf.constant(False)) is None


def test_parse_timm_string():
  spec = ra.parse('rand-m9-mstd0.5-inc1')
  assert spec == ra.RandAugmentSpec(magnitude=9, num_layers=2, magnitude_std=0.5,
                                    magnitude_max=10, increasing=True, prob=0.5)
  assert spec.op_names == ra.INCREASING_OPS and len(spec.op_names) == 15
  assert ra.parse('rand-n3-m7-inc0').op_names == ra.OPS
  assert ra.parse('rand-m9-mstd101').magnitude_std == math.inf
  for bad in ('rand-m9-foo1', 'augmix-m9', 'rand-x'):
    with pytest.raises(ValueError, match='aug.randaug'):
      ra.parse(bad)


def test_magnitude_sampling():
  spec = ra.parse('rand-m9-mstd0.5-inc1')
  levels = np.array([ra.sample_magnitude(spec, _seed(i)).numpy() for i in range(400)])
  assert levels.min() >= 0 and levels.max() <= 10
  assert abs(levels.mean() - 9.0) < 0.08 and abs(levels.std() - 0.5) < 0.08


def test_rand_augment_applies_listed_ops_at_the_magnitude(image):
  """With p = 1, one layer and mstd = 0, the output is one of the 15 ops (either sign) at m."""
  spec = ra.RandAugmentSpec(magnitude=9, num_layers=1, increasing=True, prob=1.0)
  x = tf.constant(image)
  m = tf.constant(9.0)
  candidates = {(n, s): ra.apply_op(n, x, m, tf.constant(s), FILL).numpy()
                for n in spec.op_names for s in (False, True)}
  hits = set()
  for i in range(24):
    out = ra.rand_augment(x, _seed(i), spec, FILL).numpy()
    match = [key for key, c in candidates.items() if np.array_equal(c, out)]
    assert match, f'seed {i}: output is none of the ops'
    hits.add(match[0][0])
  assert len(hits) >= 8  # ops are drawn at random
  # Deterministic in the seed; p = 0 leaves the image untouched.
  full = ra.parse('rand-m9-mstd0.5-inc1')
  np.testing.assert_array_equal(ra.rand_augment(x, _seed(3), full, FILL),
                                ra.rand_augment(x, _seed(3), full, FILL))
  off = ra.RandAugmentSpec(magnitude=9, num_layers=2, prob=0.0)
  np.testing.assert_array_equal(ra.rand_augment(x, _seed(3), off, FILL), image)


def test_random_resized_crop_box():
  areas, ratios = [], []
  for i in range(200):
    top, left, h, w = [int(v) for v in augment.random_resized_crop_box(
        tf.constant([300, 400, 3]), _seed(i))]
    assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
    areas.append(h * w / (300 * 400))
    ratios.append(w / h)
  assert min(areas) >= 0.08 - 0.01 and max(areas) <= 1.0
  assert min(ratios) >= 0.75 - 0.02 and max(ratios) <= 4 / 3 + 0.02
  assert np.median(areas) > 0.3  # uniform area in [0.08, 1] (before fit rejection)
  # 10 x 1000: no sampled box fits, timm falls back to the centred crop with ratio 4/3.
  box = [int(v) for v in augment.random_resized_crop_box(tf.constant([10, 1000, 3]), _seed(0))]
  assert box == [0, (1000 - 13) // 2, 10, 13]


def test_eval_resize_and_center_crop_matches_pil():
  yy, xx = np.mgrid[0:300, 0:400]
  smooth = np.stack([xx * 0.5, yy * 0.7, (xx + yy) * 0.3], -1).astype(np.uint8)
  out = augment.resize_and_center_crop(tf.constant(smooth), 224, 0.875).numpy()
  # timm: shorter side to 256 (-> 256 x 341), centre crop at (16, 58).
  ref = np.asarray(Image.fromarray(smooth).resize((341, 256), Image.BICUBIC))[16:240, 58:282]
  assert out.shape == (224, 224, 3)
  assert np.abs(out.astype(int) - ref).mean() < 1.0
  np.testing.assert_array_equal(
      augment.resize_and_center_crop(tf.constant(smooth[:28, :28]), 28, 1.0), smooth[:28, :28])


def test_pad_flip_normalize(image):
  x = tf.constant(image)
  padded = np.pad(image, [(2, 2), (2, 2), (0, 0)])
  offsets = set()
  for i in range(40):
    out = augment.pad_and_random_crop(x, 2, _seed(i)).numpy()
    found = [(a, b) for a in range(5) for b in range(5)
             if np.array_equal(out, padded[a:a + 37, b:b + 41])]
    assert found
    offsets.add(found[0])
  assert len(offsets) > 10
  flips = [augment.random_flip(x, _seed(i)).numpy() for i in range(20)]
  assert all(np.array_equal(f, image) or np.array_equal(f, image[:, ::-1]) for f in flips)
  assert 0 < sum(np.array_equal(f, image[:, ::-1]) for f in flips) < 20
  np.testing.assert_allclose(augment.normalize(tf.constant([[[255, 0, 51]]], tf.uint8),
                                               (0.5, 0.5, 0.1), (0.5, 0.25, 0.2)).numpy(),
                             [[[1.0, -2.0, 0.5]]], rtol=1e-6)


def test_random_erasing():
  x = tf.fill([40, 50, 3], 100.0)
  np.testing.assert_array_equal(augment.random_erasing(x, _seed(0), 0.0), x)
  fractions = []
  for i in range(30):
    out = augment.random_erasing(x, _seed(i), 1.0).numpy()
    erased = np.any(out != 100.0, axis=-1)
    rows, cols = np.nonzero(erased)
    assert erased.any()
    # A single box, filled with standard-normal noise.
    box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.mean() > 0.99
    fractions.append(box.size / 2000)
    assert abs(out[erased].std() - 1.0) < 0.25
  assert min(fractions) >= 0.015 and max(fractions) <= 0.36


def test_train_and_eval_preprocess():
  aug = ml_collections.ConfigDict(dict(random_resized_crop=True, pad_and_crop=0, hflip=True,
                                       randaug='rand-m9-mstd0.5-inc1', erase_p=0.25))
  pixels = np.random.RandomState(1).randint(0, 255, (40, 60, 3)).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).convert('L').save(buffer, 'JPEG')  # grayscale JPEG -> RGB
  kw = dict(image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
  for data, encoded in ((tf.constant(buffer.getvalue()), True), (tf.constant(pixels), False)):
    out = augment.train_preprocess(data, _seed(5), encoded=encoded, aug=aug, **kw).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(
        out, augment.train_preprocess(data, _seed(5), encoded=encoded, aug=aug, **kw))
    ev = augment.eval_preprocess(data, encoded=encoded, crop_pct=0.875, **kw).numpy()
    assert ev.shape == (32, 32, 3) and -2.0 <= ev.min() and ev.max() <= 2.0
    np.testing.assert_array_equal(
        ev, augment.eval_preprocess(data, encoded=encoded, crop_pct=0.875, **kw))


# --- mixup / cutmix ----------------------------------------------------------------------------

def _aug(mixup, cutmix, switch_prob=0.5):
  return ml_collections.ConfigDict(dict(mixup=mixup, cutmix=cutmix, switch_prob=switch_prob))


def _batch(b=6, h=8, w=10):
  """Image i is constant i + 1, so every mixed pixel shows which images it came from."""
  images = jnp.broadcast_to(jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None],
                            (b, h, w, 3))
  return images, jnp.array([3, 1, 4, 1, 5, 9])[:b]


def test_no_mixing_returns_images_and_targets_unchanged():
  images, labels = _batch()
  smooth = losses.smooth_labels(labels, 10, 0.1)
  np.testing.assert_allclose(smooth[0, 3], 0.91, rtol=1e-6)  # 1 - 0.1 + 0.1 / 10
  out, targets = augment.mixup_cutmix(jax.random.key(0), images, smooth, _aug(0.0, 0.0))
  np.testing.assert_array_equal(out, images)
  np.testing.assert_array_equal(targets, smooth)


@pytest.mark.parametrize('jit', [False, True])
def test_mixup_blends_flipped_pairs(jit):
  images, labels = _batch()
  fn = functools.partial(augment.mixup_cutmix, aug_config=_aug(0.8, 0.0))
  fn = jax.jit(fn) if jit else fn
  smooth = losses.smooth_labels(labels, 10, 0.1)
  for seed in range(3):
    out, targets = fn(jax.random.key(seed), images, smooth)
    pixels = np.asarray(out[:, 0, 0, 0])
    # pixel_i = lam (i + 1) + (1 - lam) (B - i): one lam for the batch.
    lam = (pixels[0] - 6.0) / (1.0 - 6.0)
    np.testing.assert_allclose(pixels, lam * np.arange(1, 7) + (1 - lam) * np.arange(6, 0, -1),
                               rtol=1e-5)
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    assert np.all(out == out[:, :1, :1])  # uniform blend, no box


@pytest.mark.parametrize('jit', [False, True])
def test_cutmix_pastes_a_box_of_the_partner(jit):
  images, labels = _batch(h=16, w=20)
  fn = functools.partial(augment.mixup_cutmix, aug_config=_aug(0.0, 1.0))
  fn = jax.jit(fn) if jit else fn
  smooth = losses.smooth_labels(labels, 10, 0.1)
  boxes = 0
  for seed in range(6):
    out, targets = fn(jax.random.key(seed), images, smooth)
    out = np.asarray(out[..., 0])
    own = np.arange(1, 7)[:, None, None]
    from_partner = out == own[::-1]
    assert np.all((out == own) | from_partner)
    box = from_partner[0]
    np.testing.assert_array_equal(from_partner[:3], np.broadcast_to(box, (3, 16, 20)))
    lam = 1.0 - box.mean()  # lam corrected by the pasted (clipped) area
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    boxes += box.any()
  assert boxes >= 3


def test_switch_picks_both_modes():
  images, labels = _batch()
  modes = set()
  for seed in range(12):
    out, _ = augment.mixup_cutmix(jax.random.key(seed), images,
                                  losses.smooth_labels(labels, 10, 0.1), _aug(0.8, 1.0))
    out = np.asarray(out[0, ..., 0])
    uniform = np.all(out == out[0, 0])
    is_cut = np.all((out == 1.0) | (out == 6.0))
    modes.add('mixup' if uniform and not is_cut else 'cutmix' if is_cut else '?')
  assert modes == {'mixup', 'cutmix'}
