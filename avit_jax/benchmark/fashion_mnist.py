"""The trained default model's side of the benchmark: Fashion-MNIST images and labels, its
checkpoint, and capacity's accuracy effect on the test set."""

from __future__ import annotations

import gzip
import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from avit_jax import flops, inference, models
from avit_jax.benchmark.rows import capacity_check


def test_images(count: int, data: dict | None = None,
                               split: str = 't10k') -> np.ndarray:
  """First `count` Fashion-MNIST images [B, 28, 28, 3] of `split` ('t10k' test, 'train'),
  normalised with the checkpoint's metadata['data'] mean / std when given, else those of
  configs/fashion_mnist.py."""
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  defaults = fashion_mnist.get_config().data
  data = dict(data or {})
  mean = data.get('mean', defaults.mean)
  std = data.get('std', defaults.std)
  path = os.path.join(defaults.data_dir, f'{split}-images-idx3-ubyte.gz')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: install the Fashion-MNIST IDX files '
                            '(tools/bootstrap.sh) or drop --checkpoint')
  with gzip.open(path, 'rb') as f:
    raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
  x = raw.astype(np.float32)[..., None].repeat(3, axis=-1) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def test_labels() -> np.ndarray:
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  path = os.path.join(fashion_mnist.get_config().data.data_dir, 't10k-labels-idx1-ubyte.gz')
  with gzip.open(path, 'rb') as f:
    return np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int32)


def capacity_accuracy(model, model_config, data, quantiles=(1.0, 0.99, 0.9, 0.5),
                      calibration_images: int = 2048, batch: int = 500) -> list[dict]:
  """Accuracy effect of 'capacity' on the Fashion-MNIST test set: budgets calibrated on the
  first training images at each quantile; top-1 against masked, tokens cut, and the GFLOPs
  per image the budget executes against those masked uses."""
  images = test_images(10_000, data)
  labels = test_labels()[:len(images)]
  calibration = jnp.asarray(test_images(calibration_images, data, 'train'))

  def run(predict):
    outs = [predict(jnp.asarray(images[i:i + batch])) for i in range(0, len(images), batch)]
    return (np.concatenate([np.asarray(o.logits) for o in outs]),
            np.concatenate([np.asarray(o.token_depth) for o in outs]))

  logits, depth = run(inference.make_predict_fn(model, 'masked'))
  used = float(np.mean(np.asarray(flops.gflops_per_image(depth, model_config))))
  rows = [dict(mode='masked', top1=float((logits.argmax(-1) == labels).mean()),
               gflops_per_image=used, tokens_cut_fraction=0.0)]
  for q in quantiles:
    budget = inference.calibrate_capacity(model, calibration, quantile=q)
    c_logits, c_depth = run(inference.make_predict_fn(model, 'capacity', capacity=budget))
    check = capacity_check(c_logits, c_depth, logits, depth, budget, model_config)
    rows.append(dict(mode=f'capacity q={q}', capacity=list(budget),
                     top1=float((c_logits.argmax(-1) == labels).mean()),
                     gflops_per_image=check['budget_gflops_per_image'],
                     tokens_cut_fraction=check['tokens_cut'] / depth.size,
                     top1_agreement=check['top1_agreement']))
  return rows


def load_checkpoint(directory: str):
  from avit_jax import checkpoints  # pylint: disable=import-outside-toplevel
  params, metadata = checkpoints.load_params(directory)
  if 'model' not in metadata:
    raise ValueError(f'{directory} has no metadata["model"]: cannot rebuild the model')
  model_config = ml_collections.ConfigDict(metadata['model'])
  model = models.create(model_config, seed=0)
  checkpoints.assign_params(model, params, directory)
  return model, model_config, metadata.get('data')
