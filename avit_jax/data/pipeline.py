"""Input pipeline: ImageNet (tfds or an image-folder tree) and Fashion-MNIST -> per-host batches.

config.data.source picks the data:
  'imagenet2012'   tensorflow-datasets, prepared once (`python -m avit_jax.input_pipeline --prepare_imagenet MANUAL_DIR`, or
                   `tfds build`; docs/data.md); data_dir may be gs://.
  'folder'         data_dir/<split>/<class>/*.{JPEG,jpg,png,...}; class index = sorted folder
                   names of the train split ('validation' falls back to data_dir/val).
  'fashion_mnist'  gzipped IDX files in data_dir, else tfds 'fashion_mnist' (on disk, or downloaded
                   once its server answers a quick check).

Order. Shard h of P (one shard per process, or config.data.shards of them, each process
reading a contiguous block) holds only examples h, h + P, h + 2P, ... of a split (tfds:
`split_for_jax_process`). Train batches never straddle epochs: an epoch is floor(n_h / b)
batches of b = batch_size / P examples; the example at shard position q (= step * b + k)
is permutation(seed, epoch, h)[q mod epoch length] and is augmented with a seed folded from
(seed, h, q). So the batch at step s is a function of (seed, s, h, P), and resuming at step s
costs nothing for in-memory / folder data (no skipping) and one epoch's partial read of
undecoded records for streamed tfds data.

Sources live in sources.py, per-example transforms in augment.py.

Corrupt or unreadable files in folder sets are logged by name and counted; in training their
slot takes the next readable example (its own label), in evaluation it is masked out.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from avit_jax.data import augment, sources

AUTOTUNE = tf.data.AUTOTUNE


def _hide_accelerators_from_tf():
  # tf.data only needs the CPU; keep TF off GPUs so it does not reserve their memory.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF devices already initialised: nothing left to hide.
    pass


_hide_accelerators_from_tf()


def _streams(config: ml_collections.ConfigDict) -> bool:
  """tfds without cache streams records from files; everything else is an in-memory table."""
  return config.data.source == 'imagenet2012' and not config.data.cache


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples in `split` of config.data.source (the whole split, all hosts)."""
  if config.data.source == 'imagenet2012':
    return sources.tfds_builder(config).info.splits[split].num_examples
  return len(sources.table(config, split))


# --- Iterators --------------------------------------------------------------------------------

def _process(process_index, process_count) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f'process_index must be in [0, {count}), got {index}')
  return index, count


def _per_host(batch_size: int, count: int, field: str) -> int:
  if batch_size % count or batch_size < count:
    raise ValueError(f'config.{field}={batch_size} must be a positive multiple of the number of '
                     f'processes ({count})')
  return batch_size // count


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  return options


def _prefetch(config) -> int:
  return config.data.prefetch if config.data.prefetch > 0 else AUTOTUNE


def _check_labels(config, labels: np.ndarray, name: str):
  if len(labels) and labels.max() >= config.model.num_classes:
    raise ValueError(f'{name} has labels up to {labels.max()} but config.model.num_classes='
                     f'{config.model.num_classes}')


def _preprocessors(config, encoded: bool):
  train = functools.partial(
      augment.train_preprocess, encoded=encoded, image_size=config.model.image_size,
      aug=config.aug, mean=tuple(config.data.mean), std=tuple(config.data.std))
  evaluate = functools.partial(
      augment.eval_preprocess, encoded=encoded, image_size=config.model.image_size,
      crop_pct=config.data.crop_pct, mean=tuple(config.data.mean), std=tuple(config.data.std))
  return train, evaluate


def _element_seed(seed: int, host: int, *positions) -> tf.Tensor:
  """int64 [2] stateless seed folded from (seed, host, positions...)."""
  key = tf.constant([seed, host], tf.int64)
  for p in positions:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(p, tf.int64))
  return key


def _fill_gaps(ds: tf.data.Dataset, first: int) -> tf.data.Dataset:
  """After ignore_errors: the next readable example fills each dropped position's slot."""
  def step(previous, ex):
    return ex['position'], (ex, ex['position'] - previous)
  ds = ds.scan(tf.constant(first - 1, tf.int64), step)
  return ds.flat_map(lambda ex, gap: tf.data.Dataset.from_tensors(ex).repeat(gap))


def _log_skipped(name: str, count: int):
  logging.warning('Skipped unreadable or corrupt image %s (%d so far); check or remove it.',
                  name, count)


def _table_train(config, table: sources.Table, host: int, hosts: int, batch: int,
                 start_step: int):
  per_host = len(table) // hosts
  steps_per_epoch = per_host // batch
  if steps_per_epoch == 0:
    raise ValueError(f'{table.name}: {len(table)} examples give {per_host} per process, fewer '
                     f'than the per-process batch {batch}; lower config.batch_size')
  epoch_len = steps_per_epoch * batch
  seed, load = int(config.seed), table.loader()
  preprocess, _ = _preprocessors(config, table.is_encoded)

  def locate(q):  # host positions (scalar, or a vector within one epoch) -> example indices
    epoch = tf.reshape(q, [-1])[0] // epoch_len
    shuffle_seed = tf.stack([tf.constant(seed, tf.int64), epoch * hosts + host])
    j = tf.random.experimental.index_shuffle(q % epoch_len, shuffle_seed,
                                             tf.constant(per_host - 1, tf.int64))
    return host + hosts * j

  def example(q, index):
    data, label = load(index)
    return dict(images=preprocess(data, _element_seed(seed, host, q)), labels=label, position=q)

  first = start_step * batch
  ds = tf.data.Dataset.range(first, 2**62)
  if table.is_encoded:
    # An image that fails to decode is skipped on its own: one map call per image.
    ds = ds.map(lambda q: example(q, locate(q)), AUTOTUNE)
    ds = _fill_gaps(ds.ignore_errors(), first).batch(batch, drop_remainder=True)
  else:
    # Arrays in memory: one map call per batch, a loop over its images inside (a batch
    # never straddles two epochs: epochs are whole batches). The same values as one call
    # per image, with far less per-call overhead: CPU time the train step gets back.
    signature = dict(images=tf.float32, labels=tf.int32, position=tf.int64)
    ds = ds.batch(batch, drop_remainder=True).map(
        lambda q: tf.map_fn(lambda args: example(*args), (q, locate(q)),
                            fn_output_signature=signature, parallel_iterations=16), AUTOTUNE)
  ds = ds.prefetch(_prefetch(config)).with_options(_options())

  def generate():
    skipped, position = 0, first
    for b in ds.as_numpy_iterator():
      for k in np.nonzero(b['position'] != position + np.arange(batch))[0]:
        skipped += 1
        _log_skipped(table.describe(int(locate(tf.constant(position + k, tf.int64)))), skipped)
      position += batch
      yield dict(images=b['images'], labels=b['labels'])
  return generate()


def _tfds_train(config, host: int, hosts: int, batch: int, start_step: int):
  builder = sources.tfds_builder(config)
  split = config.data.train_split
  per_host = builder.info.splits[split].num_examples // hosts
  steps_per_epoch = per_host // batch
  if steps_per_epoch == 0:
    raise ValueError(f'{split}: {per_host} examples per process < per-process batch {batch}')
  host_split = tfds.split_for_jax_process(split, process_index=host, process_count=hosts,
                                          drop_remainder=True)
  seed = int(config.seed)
  preprocess, _ = _preprocessors(config, encoded=True)

  def epoch_dataset(epoch: int, skip_batches: int) -> tf.data.Dataset:
    # This epoch's file order and shuffle-buffer seeds: a function of (seed, epoch, host).
    file_seed, buffer_seed = np.random.SeedSequence([seed, epoch, host]).generate_state(2)
    read_config = tfds.ReadConfig(shuffle_seed=int(file_seed), try_autocache=False,
                                  options=_options())
    ds = builder.as_dataset(split=host_split, shuffle_files=True, read_config=read_config,
                            decoders={'image': tfds.decode.SkipDecoding()})
    ds = ds.shuffle(config.data.shuffle_buffer_size, seed=int(buffer_seed))
    ds = ds.take(steps_per_epoch * batch).enumerate().skip(skip_batches * batch)  # before decoding

    def example(i, ex):
      seed_ = _element_seed(seed, host, epoch, i)
      return dict(images=preprocess(ex['image'], seed_), labels=tf.cast(ex['label'], tf.int32))
    ds = ds.map(example, AUTOTUNE).batch(batch, drop_remainder=True)
    return ds.prefetch(_prefetch(config)).with_options(_options())

  def generate():
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
      yield from epoch_dataset(epoch, skip).as_numpy_iterator()
      epoch, skip = epoch + 1, 0
  return generate()


def train_iterator(config: ml_collections.ConfigDict, *, start_step: int = 0,
                   process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator over this process's share of each global train batch.

  Yields dict(images=float32 [b, S, S, 3] normalised, labels=int32 [b]), b = batch_size / P.
  The order is defined over config.data.shards shards (0: P), each process reading its
  contiguous block of them: the batch at step s depends only on (config.seed, s, shard,
  shards), and starting at `start_step` yields what an uninterrupted iterator yields from
  that step on.
  """
  host, hosts = _process(process_index, process_count)
  shards = config.data.shards or hosts
  if shards % hosts:
    raise ValueError(f'config.data.shards={shards} must be a multiple of the number of '
                     f'processes ({hosts}), or 0 (one per process)')
  batch = _per_host(config.batch_size, shards, 'batch_size')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  per_process = shards // hosts
  parts = [_shard_train(config, host * per_process + i, shards, batch, start_step)
           for i in range(per_process)]
  if per_process == 1:
    return parts[0]
  return ({k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
          for batches in zip(*parts))


def _shard_train(config, shard: int, shards: int, batch: int, start_step: int):
  if _streams(config):
    return _tfds_train(config, shard, shards, batch, start_step)
  table = sources.table(config, config.data.train_split)
  _check_labels(config, table.labels, table.name)
  return _table_train(config, table, shard, shards, batch, start_step)


def _padded(ds: tf.data.Dataset, image_size: int, total: int, batch: int) -> tf.data.Dataset:
  """Appends mask-0 padding up to `total` examples, then batches."""
  pad = dict(images=tf.zeros([image_size, image_size, 3]), labels=tf.constant(0, tf.int32),
             mask=tf.constant(0.0), position=tf.constant(-1, tf.int64))
  return ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(total).batch(batch)


def eval_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass over config.data.eval_split (first config.num_eval_images if > 0).

  Yields dict(images=float32 [b, S, S, 3], labels=int32 [b], mask=float32 [b]) with
  b = eval_batch_size / P; every process yields the same number of batches, padding
  (mask 0) fills the last ones.
  """
  host, hosts = _process(process_index, process_count)
  batch = _per_host(config.eval_batch_size, hosts, 'eval_batch_size')
  split, limit = config.data.eval_split, config.num_eval_images
  size = config.model.image_size
  if _streams(config):
    builder = sources.tfds_builder(config)
    n = builder.info.splits[split].num_examples
    n = min(n, limit) if limit > 0 else n
    host_split = tfds.split_for_jax_process(f'{split}[:{n}]', process_index=host,
                                            process_count=hosts)
    count = n // hosts + (host < n % hosts)
    ds = builder.as_dataset(split=host_split, shuffle_files=False,
                            read_config=tfds.ReadConfig(try_autocache=False, options=_options()),
                            decoders={'image': tfds.decode.SkipDecoding()})
    ds, table = ds.enumerate(), None
    encoded = True
  else:
    table = sources.table(config, split)
    _check_labels(config, table.labels, table.name)
    n = min(len(table), limit) if limit > 0 else len(table)
    count = len(range(host, n, hosts))
    load = table.loader()
    ds = tf.data.Dataset.range(count).map(
        lambda j: (j, dict(zip(('image', 'label'), load(host + hosts * j)))))
    encoded = table.is_encoded
  if n == 0:
    raise ValueError(f'Eval split {split!r} of {config.data.source} is empty')
  _, preprocess = _preprocessors(config, encoded)

  def example(j, ex):
    return dict(images=preprocess(ex['image']), labels=tf.cast(ex['label'], tf.int32),
                mask=tf.constant(1.0), position=tf.cast(j, tf.int64))
  ds = ds.map(example, AUTOTUNE)
  if encoded and table is not None:
    ds = ds.ignore_errors()
  total = math.ceil(math.ceil(n / hosts) / batch) * batch
  ds = _padded(ds, size, total, batch).prefetch(_prefetch(config)).with_options(_options())

  def generate():
    expected, skipped = 0, 0
    for b in ds.as_numpy_iterator():
      for j in b['position'][b['mask'] > 0].tolist():
        for missing in range(expected, j):
          skipped += 1
          _log_skipped(table.describe(host + hosts * missing), skipped)
        expected = j + 1
      yield dict(images=b['images'], labels=b['labels'], mask=b['mask'])
    for missing in range(expected, count):
      skipped += 1
      _log_skipped(table.describe(host + hosts * missing), skipped)
  return generate()


def eval_images(config: ml_collections.ConfigDict, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` images (float32, normalised) and labels of the configured eval split,
  on this host, padding dropped."""
  config = config.copy_and_resolve_references()
  config.num_eval_images = count
  images, labels, have = [], [], 0
  for batch in eval_iterator(config, process_index=0, process_count=1):
    keep = np.asarray(batch['mask']) > 0
    images.append(np.asarray(batch['images'], np.float32)[keep])
    labels.append(np.asarray(batch['labels'])[keep])
    have += int(keep.sum())
    if have >= count:
      break
  if not have:
    raise ValueError(f'the eval split {config.data.eval_split!r} of {config.data.source!r} '
                     'gave no images')
  return np.concatenate(images)[:count], np.concatenate(labels)[:count]


# --- Benchmark --------------------------------------------------------------------------------

def benchmark(config: ml_collections.ConfigDict, num_batches: int = 50) -> dict[str, float]:
  """Images per second of the train and eval pipelines on this host.

  One warm-up batch each, then up to `num_batches` batches (eval: at most one pass).
  """
  rates = {}
  for name, iterator in (('train', train_iterator(config)), ('eval', eval_iterator(config))):
    next(iterator)
    images, start = 0, time.perf_counter()
    for _, b in zip(range(num_batches), iterator):
      images += len(b['labels'])
    rates[name] = images / max(time.perf_counter() - start, 1e-9)
  return rates
