"""Data sources: a split as an indexable table (Fashion-MNIST IDX, image folders, cached tfds)
or a prepared tfds builder (streamed ImageNet). Knows nothing about batching or augmentation.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import socket
import urllib.parse
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from avit_jax import config_lib

SOURCES = ('imagenet2012', 'folder', 'fashion_mnist')
# Files an image folder may hold (what augment.decode reads); visualize accepts the same.
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif', '.webp')
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {'train': 'train', 'test': 't10k'}
IMAGENET_ARCHIVES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


class DataNotFoundError(FileNotFoundError, ValueError):
  """The data a config names is not there: a missing file, and a config value to fix (so
  callers that report config mistakes in one line report it too)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Table:
  """A split addressable by index: decoded uint8 arrays, encoded bytes, or file paths."""
  name: str
  labels: np.ndarray                   # int32 [n]
  images: np.ndarray | None = None     # uint8 [n, H, W] or [n, H, W, C]
  encoded: np.ndarray | None = None    # object [n] of bytes
  paths: tuple[str, ...] | None = None

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def is_encoded(self) -> bool:
    return self.images is None

  def describe(self, index: int) -> str:
    return self.paths[index] if self.paths else f'{self.name}[{index}]'

  def loader(self) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """index -> (uint8 [H, W, 3] image or encoded bytes, int32 label), for tf.data maps."""
    labels = tf.constant(self.labels, tf.int32)
    if self.images is not None:
      images = tf.constant(self.images)

      def load(i):
        image = tf.gather(images, i)
        image = image if image.shape.rank == 3 else image[..., None]
        return tf.broadcast_to(image, tf.concat([tf.shape(image)[:2], [3]], 0)), labels[i]
    elif self.encoded is not None:
      encoded = tf.constant(self.encoded, tf.string)

      def load(i):
        return encoded[i], labels[i]
    else:
      paths = tf.constant(self.paths, tf.string)

      def load(i):
        return tf.io.read_file(paths[i]), labels[i]
    return load


def read_idx(path: str) -> np.ndarray:
  """An IDX file (optionally gzipped) -> uint8 array with the shape in its header."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  magic = int.from_bytes(data[:4], 'big')
  if magic >> 8 != 0x08:  # 0x08 = unsigned byte; the low byte is the number of dimensions
    raise ValueError(f'{path} is not an unsigned-byte IDX file (magic {magic:#010x})')
  ndim = magic & 0xFF
  shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != math.prod(shape):
    raise ValueError(f'{path} is truncated: header says {shape}, found {array.size} values')
  return array.reshape(shape)


@functools.lru_cache(maxsize=4)
def fashion_mnist(data_dir: str, split: str) -> Table:
  if split not in FASHION_MNIST_FILES:
    raise ValueError(f'Fashion-MNIST has splits {sorted(FASHION_MNIST_FILES)}, got {split!r} '
                     '(config.data.train_split / eval_split)')
  prefix = FASHION_MNIST_FILES[split]
  tried = []
  for suffix in ('.gz', ''):
    paths = [os.path.join(data_dir, f'{prefix}-{kind}-idx{nd}-ubyte{suffix}')
             for kind, nd in (('images', 3), ('labels', 1))]
    tried += paths
    if all(os.path.exists(p) for p in paths):
      images, labels = read_idx(paths[0]), read_idx(paths[1])
      if images.shape[0] != labels.shape[0]:
        raise ValueError(f'{paths[0]} has {images.shape[0]} images but {paths[1]} has '
                         f'{labels.shape[0]} labels')
      return Table(f'fashion_mnist/{split}', labels.astype(np.int32), images=images)
  try:
    images, labels = _tfds_fashion_mnist(split)
  except Exception as e:  # pylint: disable=broad-except
    raise DataNotFoundError(
        f'Fashion-MNIST not found. Tried the IDX files {tried} (config.data.data_dir='
        f'{data_dir!r}) and tensorflow-datasets "fashion_mnist" ({type(e).__name__}: {e}). '
        'Provide the data with `apt-get install dataset-fashion-mnist` (installs '
        '/usr/share/datasets/fashion-mnist), or copy train-/t10k-{images-idx3,labels-idx1}-'
        'ubyte.gz into a directory and set --config.data.data_dir to it.') from None
  return Table(f'fashion_mnist/{split}', labels.astype(np.int32), images=images)


def _tfds_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
  """tensorflow-datasets' copy: read from disk when prepared, else downloaded, but only after
  its server answered a quick connection test (offline, tfds would retry for minutes)."""
  builder = tfds.builder('fashion_mnist')
  if not builder.is_prepared():
    check_reachable(tfds.builder_cls('fashion_mnist').URL)
    builder.download_and_prepare()
  return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))


def check_reachable(url: str, timeout: float = 5.0) -> None:
  """Raises ConnectionError within `timeout` seconds unless a TCP connection to `url`'s host
  opens (a download would then at least start)."""
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == 'https' else 80)
  try:
    socket.create_connection((parts.hostname, port), timeout=timeout).close()
  except OSError as e:
    raise ConnectionError(f'cannot reach {parts.hostname}:{port} to download ({e}); no network?'
                          ) from None


def _folder_split_dir(root: str, split: str) -> str:
  candidates = [os.path.join(root, split)]
  if split == 'validation':
    candidates.append(os.path.join(root, 'val'))
  for path in candidates:
    if tf.io.gfile.isdir(path):
      return path
  raise DataNotFoundError(f'No split directory for split {split!r}: tried {candidates}. Expected '
                          'ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG with '
                          'config.data.data_dir=ROOT.')


def _subdirs(path: str) -> list[str]:
  return sorted(d.rstrip('/') for d in tf.io.gfile.listdir(path)
                if tf.io.gfile.isdir(os.path.join(path, d)))


def folder_classes(root: str, split: str, train_split: str) -> list[str]:
  """Class folder names, index order: the train split's (so every split agrees on them), or
  `split`'s own where there is no train split."""
  try:
    return _subdirs(_folder_split_dir(root, train_split))
  except FileNotFoundError:
    return _subdirs(_folder_split_dir(root, split))


@functools.lru_cache(maxsize=4)
def folder(root: str, split: str, train_split: str, cache: bool) -> Table:
  if not root:
    raise ValueError('config.data.source="folder" needs config.data.data_dir=ROOT holding '
                     'ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG')
  split_dir = _folder_split_dir(root, split)
  classes = folder_classes(root, split, train_split)
  index = {name: i for i, name in enumerate(classes)}
  paths, labels = [], []
  for name in _subdirs(split_dir):
    if name not in index:
      raise ValueError(f'Class folder {os.path.join(split_dir, name)} has no counterpart in the '
                       f'train split ({len(classes)} classes); class indices would disagree.')
    folder = os.path.join(split_dir, name)
    files = sorted(f for f in tf.io.gfile.listdir(folder)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise ValueError(f'Class folder {folder} holds no images (extensions {IMAGE_EXTENSIONS})')
    paths += [os.path.join(folder, f) for f in files]
    labels += [index[name]] * len(files)
  if not paths:
    raise ValueError(f'Split directory {split_dir} has no class folders with images')
  logging.info('folder %s: %d images in %d classes', split_dir, len(paths), len(classes))
  labels = np.asarray(labels, np.int32)
  if cache:  # Small sets: read every file once, keep the encoded bytes in memory.
    encoded = np.array([tf.io.gfile.GFile(p, 'rb').read() for p in paths], dtype=object)
    return Table(split_dir, labels, encoded=encoded, paths=tuple(paths))
  return Table(split_dir, labels, paths=tuple(paths))


def tfds_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder of config.data.source, where every source that is neither
  Fashion-MNIST's files nor a folder ends up (so an unknown name is refused here)."""
  check_config(config.data)
  builder = tfds.builder(config.data.source, data_dir=config.data.data_dir or None)
  if not builder.is_prepared():
    raise DataNotFoundError(
        f'tfds {config.data.source} is not prepared under {builder.data_dir}. Prepare it once: '
        'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in MANUAL_DIR, run `tfds build '
        'imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR` and set '
        '--config.data.data_dir=DATA_DIR (a gs:// bucket works); or use an image folder with '
        '--config.data.source=folder. See docs/data.md.')
  return builder


@functools.lru_cache(maxsize=2)
def tfdstable(name: str, data_dir: str, split: str) -> Table:
  """Whole tfds split as encoded bytes in memory (config.data.cache on a tfds source)."""
  builder = tfds.builder(name, data_dir=data_dir or None)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  encoded, labels = [], []
  for ex in ds.map(lambda ex: (ex['image'], ex['label'])).batch(1024).as_numpy_iterator():
    encoded += list(ex[0])
    labels.append(ex[1])
  return Table(f'{name}/{split}', np.concatenate(labels).astype(np.int32),
                encoded=np.array(encoded, dtype=object))


def table(config: ml_collections.ConfigDict, split: str) -> Table:
  source, data_dir = config.data.source, config.data.data_dir
  if source == 'fashion_mnist':
    return fashion_mnist(data_dir or FASHION_MNIST_DIR, split)
  if source == 'folder':
    return folder(data_dir, split, config.data.train_split, bool(config.data.cache))
  tfds_builder(config)
  return tfdstable(source, data_dir, split)


def check_config(data_config: ml_collections.ConfigDict) -> None:
  """The static check of config.data: a known source (`check_data` looks at the files)."""
  if data_config.source not in SOURCES:
    raise config_lib.invalid('data.source', data_config.source, f'expected one of {SOURCES}')


def check_data(config: ml_collections.ConfigDict, fields: tuple[str, ...]) -> int | None:
  """The splits named by config.data.<fields> exist in the source and hold data; returns
  the number of classes of the source (None: not known yet).

  Fashion-MNIST is read as the pipeline reads it (the tables are cached for it); a folder
  tree is only listed; a tfds source is checked against its builder info when prepared,
  which needs no download (an unprepared one is reported with its instructions when the
  pipeline opens it).
  """
  data, source = config.data, config.data.source

  def check_names(available) -> None:
    for field in fields:
      if data[field] not in available:
        raise config_lib.invalid(f'data.{field}', data[field],
                                 f'{source} has splits {sorted(available)}')

  if source == 'fashion_mnist':
    check_names(FASHION_MNIST_FILES)
    return max(int(table(config, data[f]).labels.max(initial=-1)) for f in fields) + 1
  if source == 'folder':
    root = data.data_dir
    if not root or not tf.io.gfile.isdir(root):
      raise config_lib.invalid('data.data_dir', root, 'source "folder" needs an existing '
                               'directory ROOT holding ROOT/train/<class>/*.JPEG and '
                               'ROOT/val/<class>/*.JPEG')
    for field in fields:
      split = data[field]
      try:
        _folder_split_dir(root, split)
      except FileNotFoundError:
        raise config_lib.invalid(
            f'data.{field}', split, f'{root} has no folder {split!r}'
            f'{" (or val)" if split == "validation" else ""}; its folders are '
            f'{_subdirs(root)}') from None
    return len(folder_classes(root, data[fields[0]], data.train_split))
  builder = tfds.builder(source, data_dir=data.data_dir or None)
  if not builder.is_prepared():
    return None
  check_names(builder.info.splits.keys())
  label = builder.info.features['label'] if 'label' in builder.info.features else None
  return getattr(label, 'num_classes', None)


def prepare_imagenet(config: ml_collections.ConfigDict, manual_dir: str) -> str:
  """Builds tfds imagenet2012 into config.data.data_dir from the archives in `manual_dir`.

  The same as `tfds build imagenet2012 --manual_dir=... --data_dir=...`, without the CLI's
  apache-beam dependency. Returns the prepared dataset directory.
  """
  missing = [os.path.join(manual_dir, a) for a in IMAGENET_ARCHIVES
             if not tf.io.gfile.exists(os.path.join(manual_dir, a))]
  if missing:
    raise FileNotFoundError(f'Missing {missing}: download them from https://image-net.org '
                            '(ILSVRC 2012, training and validation images) into manual_dir')
  builder = tfds.builder('imagenet2012', data_dir=config.data.data_dir or None)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder.data_dir
