"""Input pipeline on the Fashion-MNIST IDX files and on image-folder trees built from them."""

import gzip
import io
import logging
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from avit_jax.data import sources, pipeline
from tests.helpers import MEAN, REPO, STD, data_config, gray_pixels

# Folder names whose sorted order differs from the Fashion-MNIST class ids.
CLASS_DIRS = {0: 'zeta_tshirt', 1: 'alpha_trouser', 2: 'mid_pullover'}
FOLDER_LABEL = {1: 0, 2: 1, 0: 2}  # Fashion-MNIST id -> index of its folder in sorted order


def _read_idx(path, offset):  # independent of pipeline._read_idx
  with gzip.open(path, 'rb') as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


@pytest.fixture(scope='module')
def raw_test(fashion_mnist_dir):
  images = _read_idx(os.path.join(fashion_mnist_dir, 't10k-images-idx3-ubyte.gz'), 16)
  labels = _read_idx(os.path.join(fashion_mnist_dir, 't10k-labels-idx1-ubyte.gz'), 8)
  return images.reshape(-1, 28, 28), labels


def _identify(pixels, candidates, tolerance=0.0):
  """Index in `candidates` [N, H, W] of each image in `pixels` [B, H, W] (mean abs diff)."""
  diff = np.abs(pixels[:, None].astype(np.float32) - candidates[None].astype(np.float32))
  diff = diff.mean(axis=(2, 3))
  assert (diff.min(axis=1) <= tolerance).all(), diff.min(axis=1)
  return diff.argmin(axis=1)


def _save(image, path, mode):
  pil = Image.fromarray(image)
  if mode == 'PNG':
    pil.save(path, 'PNG')
  else:  # 'L' or 'CMYK' JPEG
    pil.convert(mode).save(path, 'JPEG', quality=98)


@pytest.fixture(scope='module')
def folder(tmp_path_factory, raw_test):
  """ROOT/{train,val}/<class>/ with 8 + 2 test-set images per class; PNG plus gray / CMYK JPEG."""
  images, labels = raw_test
  root = tmp_path_factory.mktemp('folder')
  stored = {'train': [], 'val': []}  # (raw index, format) in the pipeline's file order
  for fm_class, name in sorted(CLASS_DIRS.items(), key=lambda kv: kv[1]):
    chosen = np.nonzero(labels == fm_class)[0][:10]
    for split, indices in (('train', chosen[:8]), ('val', chosen[8:])):
      os.makedirs(root / split / name)
      for k, i in enumerate(indices):
        mode = {0: 'L', 1: 'CMYK'}.get(k, 'PNG') if split == 'train' else 'PNG'
        suffix = 'png' if mode == 'PNG' else 'JPEG'
        _save(images[i], root / split / name / f'img{k}.{suffix}', mode)
        stored[split].append(i)
  return root, {k: np.asarray(v) for k, v in stored.items()}


def test_fashion_mnist_eval_is_the_idx_data(raw_test):
  images, labels = raw_test
  config = data_config()
  config.num_eval_images = 300
  config.eval_batch_size = 128
  batches = list(pipeline.eval_iterator(config))
  assert len(batches) == 3
  b = batches[0]
  assert b['images'].shape == (128, 28, 28, 3) and b['images'].dtype == np.float32
  assert b['labels'].dtype == np.int32 and b['mask'].dtype == np.float32
  # Normalised range: stored 0 and 255 map to (0 - mean) / std and (1 - mean) / std.
  np.testing.assert_allclose(b['images'].min(), -MEAN / STD, rtol=1e-6)
  np.testing.assert_allclose(b['images'].max(), (1 - MEAN) / STD, rtol=1e-6)
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, np.r_[np.ones(300), np.zeros(84)])
  real = mask > 0
  got = np.concatenate([gray_pixels(b['images']) for b in batches])[real]
  np.testing.assert_array_equal(got, images[:300])
  np.testing.assert_array_equal(np.concatenate([b['labels'] for b in batches])[real], labels[:300])
  assert pipeline.num_examples(config, 'train') == 60_000
  assert pipeline.num_examples(config, 'test') == 10_000


def test_fashion_mnist_train_labels_match_images(fashion_mnist_dir):
  raw = _read_idx(os.path.join(fashion_mnist_dir, 'train-images-idx3-ubyte.gz'), 16)
  raw_labels = _read_idx(os.path.join(fashion_mnist_dir, 'train-labels-idx1-ubyte.gz'), 8)
  label_sets = {}
  for image, label in zip(raw.reshape(-1, 784), raw_labels):
    label_sets.setdefault(image.tobytes(), set()).add(int(label))
  config = data_config()
  config.batch_size = 64
  iterator = pipeline.train_iterator(config)
  for _ in range(2):
    b = next(iterator)
    assert b['images'].shape == (64, 28, 28, 3) and b['labels'].dtype == np.int32
    for pixels, label in zip(gray_pixels(b['images']).astype(np.uint8), b['labels']):
      assert int(label) in label_sets[pixels.reshape(-1).tobytes()]


def test_light_recipe_shapes_and_range():
  config = data_config(plain=False)  # pad 2 + random crop, flip
  config.batch_size = 32
  b = next(pipeline.train_iterator(config))
  assert b['images'].shape == (32, 28, 28, 3) and b['images'].dtype == np.float32
  assert b['images'].min() >= -MEAN / STD - 1e-6 and b['images'].max() <= (1 - MEAN) / STD + 1e-6
  gray_pixels(b['images'])  # still 3 equal channels
  assert set(np.unique(b['labels'])) <= set(range(10))


def test_folder_eval_labels_and_decoding(folder, raw_test):
  root, stored = folder
  images, labels = raw_test
  config = data_config(root, source='folder')
  assert pipeline.num_examples(config, 'train') == 24
  assert pipeline.num_examples(config, 'validation') == 6  # 'validation' -> ROOT/val
  batches = list(pipeline.eval_iterator(config))
  assert [b['mask'].sum() for b in batches] == [6.0]
  pixels = gray_pixels(batches[0]['images'])[:6]
  np.testing.assert_array_equal(pixels, images[stored['val']])  # PNG: exact
  want = [FOLDER_LABEL[int(labels[i])] for i in stored['val']]
  np.testing.assert_array_equal(batches[0]['labels'][:6], want)
  # Eval is deterministic, and the same with the encoded files cached in memory.
  again = next(pipeline.eval_iterator(config))
  np.testing.assert_array_equal(again['images'], batches[0]['images'])
  config.data.cache = True
  cached = next(pipeline.eval_iterator(config))
  np.testing.assert_array_equal(cached['images'], batches[0]['images'])


def _train_indices(config, stored, raw, steps, **kwargs):
  """Raw indices and labels of the images in `steps` train batches (plain config)."""
  iterator = pipeline.train_iterator(config, **kwargs)
  found, labels = [], []
  for _ in range(steps):
    b = next(iterator)
    # Gray and CMYK JPEGs are lossy: match them to the nearest stored image.
    found.append(stored[_identify(gray_pixels(b['images']), raw[stored], tolerance=3.0)])
    labels.append(b['labels'])
  return np.stack(found), np.stack(labels)


def test_folder_shards_disjoint_cover_and_epochs(folder, raw_test):
  root, stored = folder
  images, labels = raw_test
  config = data_config(root, source='folder')  # batch 6 over 2 processes: 3 each, 4 steps / epoch
  seen = []
  for host in range(2):
    found, got_labels = _train_indices(config, stored['train'], images, 8, process_index=host,
                                       process_count=2)
    np.testing.assert_array_equal(got_labels, np.vectorize(FOLDER_LABEL.get)(labels[found]))
    epoch0, epoch1 = found[:4].reshape(-1), found[4:].reshape(-1)
    assert len(set(epoch0)) == 12 and set(epoch0) == set(epoch1)  # permutation of the shard
    assert not np.array_equal(epoch0, epoch1)  # reshuffled per epoch
    seen.append(set(epoch0))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(stored['train'])


def test_resume_gives_the_same_batches_deit_recipe(folder):
  root, _ = folder
  config = data_config(root, source='folder', plain=False)
  config.model.image_size = 32
  config.aug.random_resized_crop = True
  config.aug.randaug = 'rand-m9-mstd0.5-inc1'
  config.aug.erase_p = 0.25
  iterator = pipeline.train_iterator(config)  # 24 images, batch 6: 4 steps per epoch
  run = [next(iterator) for _ in range(7)]
  assert run[0]['images'].shape == (6, 32, 32, 3)
  resumed = pipeline.train_iterator(config, start_step=5)  # past the first epoch
  for step in range(5, 7):
    b = next(resumed)
    np.testing.assert_array_equal(b['images'], run[step]['images'])
    np.testing.assert_array_equal(b['labels'], run[step]['labels'])


def test_resume_mid_epoch_and_seed(folder):
  root, _ = folder
  config = data_config(root, source='folder', plain=False)
  run = [b for _, b in zip(range(3), pipeline.train_iterator(config))]
  resumed = next(pipeline.train_iterator(config, start_step=2))
  np.testing.assert_array_equal(resumed['images'], run[2]['images'])
  config.seed = 1
  other = next(pipeline.train_iterator(config))
  assert not np.array_equal(other['images'], run[0]['images'])


def test_fashion_mnist_eval_shards_pad_to_equal_batches(raw_test):
  images, labels = raw_test
  config = data_config()
  config.num_eval_images = 101
  config.eval_batch_size = 20  # 10 per process; 51 and 50 examples -> 6 batches each
  real = []
  for host in range(2):
    batches = list(pipeline.eval_iterator(config, process_index=host, process_count=2))
    assert len(batches) == 6 and batches[0]['images'].shape == (10, 28, 28, 3)
    mask = np.concatenate([b['mask'] for b in batches]) > 0
    assert mask.sum() == 51 - host
    pixels = np.concatenate([gray_pixels(b['images']) for b in batches])[mask]
    index = _identify(pixels, images[:101])
    np.testing.assert_array_equal(np.concatenate([b['labels'] for b in batches])[mask],
                                  labels[index])
    real.append(index)
  assert not set(real[0]) & set(real[1])
  assert set(real[0]) | set(real[1]) == set(range(101))


def test_corrupt_images_are_skipped_and_named(tmp_path, raw_test, caplog):
  images, labels = raw_test
  for split in ('train', 'val'):
    for name in ('a', 'b'):
      os.makedirs(tmp_path / split / name)
      for k in range(3):
        _save(images[k], tmp_path / split / name / f'{k}.png', 'PNG')
    (tmp_path / split / 'a' / 'broken.JPEG').write_bytes(b'not an image at all')
  good = io.BytesIO()
  Image.fromarray(images[0]).save(good, 'JPEG')
  (tmp_path / 'train' / 'b' / 'truncated.JPEG').write_bytes(good.getvalue()[:100])
  config = data_config(tmp_path, source='folder')
  config.batch_size = 4  # 8 files: 2 steps per epoch
  caplog.set_level(logging.WARNING)
  iterator = pipeline.train_iterator(config)
  batches = [next(iterator) for _ in range(4)]  # two epochs, each meets both bad files
  assert all(b['images'].shape == (4, 28, 28, 3) for b in batches)
  messages = ' '.join(r.getMessage() for r in caplog.records)
  assert 'broken.JPEG' in messages and 'truncated.JPEG' in messages
  assert sum('Skipped' in r.getMessage() for r in caplog.records) == 4
  for b in batches:  # every slot holds a readable image with its own label
    np.testing.assert_array_equal(_identify(gray_pixels(b['images']), images[:3]) >= 0, True)
  caplog.clear()
  batches = list(pipeline.eval_iterator(config))
  assert sum(b['mask'].sum() for b in batches) == 6
  assert 'broken.JPEG' in ' '.join(r.getMessage() for r in caplog.records)


def test_missing_data_errors(tmp_path, monkeypatch):
  # No IDX files, no prepared tfds copy, no network: the error comes at once, without a
  # download attempt (tfds alone would retry for minutes).
  real_builder = sources.tfds.builder
  monkeypatch.setattr(sources.tfds, 'builder',
                      lambda name, **kwargs: real_builder(name, data_dir=str(tmp_path / 'tfds')))

  def refuse(address, timeout=None):
    raise ConnectionRefusedError(111, 'Connection refused')
  monkeypatch.setattr(sources.socket, 'create_connection', refuse)
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as error:
    pipeline.num_examples(data_config(tmp_path / 'fm'), 'train')
  assert time.monotonic() - start < 10
  idx = [str(tmp_path / 'fm' / f'train-{k}-idx{n}-ubyte{s}') for s in ('.gz', '')
         for k, n in (('images', 3), ('labels', 1))]
  assert str(error.value) == (
      f'Fashion-MNIST not found. Tried the IDX files {idx} (config.data.data_dir='
      f"'{tmp_path / 'fm'}') and tensorflow-datasets \"fashion_mnist\" (ConnectionError: cannot "
      'reach fashion-mnist.s3-website.eu-central-1.amazonaws.com:80 to download ([Errno 111] '
      'Connection refused); no network?). Provide the data with `apt-get install '
      'dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist), or copy '
      'train-/t10k-{images-idx3,labels-idx1}-ubyte.gz into a directory and set '
      '--config.data.data_dir to it.')

  with pytest.raises(FileNotFoundError, match='ROOT/train'):
    pipeline.num_examples(data_config(tmp_path, source='folder'), 'train')
  os.makedirs(tmp_path / 'train' / 'empty_class')
  with pytest.raises(ValueError, match='empty_class holds no images'):
    pipeline.num_examples(data_config(tmp_path, source='folder'), 'train')
  config = data_config()
  config.data.source = 'mnist'
  with pytest.raises(ValueError) as error:
    pipeline.train_iterator(config)
  assert str(error.value) == ("config.data.source='mnist' is invalid: expected one of "
                              "('imagenet2012', 'folder', 'fashion_mnist')")
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    pipeline.train_iterator(data_config(), process_index=0, process_count=4)


def test_benchmark_reports_rates():
  config = data_config(plain=False)
  config.eval_batch_size = 100
  rates = pipeline.benchmark(config, num_batches=3)
  assert set(rates) == {'train', 'eval'} and all(r > 0 for r in rates.values())


def _fake_imagenet_archives(manual_dir):
  """ILSVRC2012_img_{train,val}.tar as tfds expects, 6 + 6 train and 5 val flat JPEGs."""
  def jpeg(value):
    b = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(b, 'JPEG', quality=100)
    return b.getvalue()

  def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  os.makedirs(manual_dir)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for k, synset in enumerate(['n01440764', 'n01443537']):  # classes 0 and 1
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as t:
        for i in range(6):
          add(t, f'{synset}_{i}.JPEG', jpeg(50 + 100 * k))
      add(outer, f'{synset}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as t:
    for i in range(1, 6):
      add(t, f'ILSVRC2012_val_{i:08d}.JPEG', jpeg(200))


def test_imagenet2012_through_tfds(tmp_path):
  _fake_imagenet_archives(tmp_path / 'manual')
  config = data_config(tmp_path / 'data', source='imagenet2012')
  with pytest.raises(FileNotFoundError, match='is not prepared'):
    pipeline.train_iterator(config)
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar'):
    sources.prepare_imagenet(config, str(tmp_path))
  sources.prepare_imagenet(config, str(tmp_path / 'manual'))  # as `--prepare_imagenet`
  config.model.num_classes = 1000
  config.data.eval_split = 'validation'
  config.data.mean, config.data.std = (0.5,) * 3, (0.5,) * 3
  config.batch_size = 4
  assert pipeline.num_examples(config, 'train') == 12
  for cache in (False, True):
    config.data.cache = cache
    seen = []
    for host in range(2):  # 6 examples per process, batch 2: 3 steps per epoch
      iterator = pipeline.train_iterator(config, process_index=host, process_count=2)
      run = [next(iterator) for _ in range(4)]
      for b in run:  # flat images: value 50 is class 0, value 150 class 1
        assert b['images'].shape == (2, 28, 28, 3)
        value = np.round((b['images'].mean(axis=(1, 2, 3)) * 0.5 + 0.5) * 255)
        np.testing.assert_allclose(value, np.where(b['labels'] == 0, 50, 150), atol=2)
      seen.append(np.concatenate([b['labels'] for b in run[:3]]))
      resumed = next(pipeline.train_iterator(config, start_step=3, process_index=host,
                                                   process_count=2))
      np.testing.assert_array_equal(resumed['images'], run[3]['images'])
    assert sorted(np.concatenate(seen).tolist()) == [0] * 6 + [1] * 6
    batches = list(pipeline.eval_iterator(config))
    assert sum(b['mask'].sum() for b in batches) == 5




@pytest.mark.parametrize('case', ['wrong_split', 'missing_imagenet'])
def test_data_check_command_prints_one_line(tmp_path, case):
  """`python -m avit_jax.input_pipeline` (the README's data check): main's one-line error."""
  if case == 'wrong_split':
    flags = ['configs/tiny.py', '--config.data.source=fashion_mnist',
             '--config.data.data_dir=/usr/share/datasets/fashion-mnist']
    message = ("error: config.data.eval_split='validation' is invalid: fashion_mnist has "
               "splits ['test', 'train']")
  else:
    flags = ['configs/tiny.py', f'--config.data.data_dir={tmp_path}']
    version = tfds.builder_cls('imagenet2012').VERSION
    message = (f'error: tfds imagenet2012 is not prepared under {tmp_path}/imagenet2012/'
               f'{version}. Prepare it once: put ILSVRC2012_img_train.tar and '
               'ILSVRC2012_img_val.tar in MANUAL_DIR, run `tfds build imagenet2012 '
               '--manual_dir=MANUAL_DIR --data_dir=DATA_DIR` and set '
               '--config.data.data_dir=DATA_DIR (a gs:// bucket works); or use an image '
               'folder with --config.data.source=folder. See docs/data.md.')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run([sys.executable, '-m', 'avit_jax.input_pipeline', '--config', *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == message
  assert 'Traceback' not in result.stderr and not result.stdout
