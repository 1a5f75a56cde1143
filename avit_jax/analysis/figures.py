"""Token-depth maps and per-layer halting plots of a model on some images (the library of
`python -m avit_jax.visualize`).

Images given as files are resized (shorter side, bicubic) and centre-cropped to the
model's image size, then normalised with the data mean / std stored in the checkpoint's
metadata (or --config's). With --config and no files, the first N images of the
configured eval split are used; `--config.a.b=value` overrides work as in avit_jax.main
(both are parsed by ml_collections' config_flags).
The drawing itself lives in plots.py; this module runs the model and writes the figures.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from avit_jax import models
from avit_jax.analysis import plots
from avit_jax.data import pipeline
from avit_jax.models import AViT
from avit_jax.training import losses
from avit_jax.training import workdir as workdir_lib

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
CLASS_NAMES = {'fashion_mnist': FASHION_MNIST_CLASSES}


# ---------------------------------------------------------------- checkpoints and config

def workdir_config(checkpoint: str) -> ml_collections.ConfigDict | None:
  """The config.json of the training run `checkpoint` belongs to (a workdir, or one of its
  steps WORKDIR/checkpoints/<step>), or None when there is none."""
  path = epath.Path(checkpoint)
  return workdir_lib.saved_config(path) or workdir_lib.saved_config(path.parent.parent)


def data_stats(metadata: Mapping, config: ml_collections.ConfigDict | None) -> tuple:
  """(mean, std) of the training data: checkpoint metadata['data'] first, then config.data."""
  data = metadata.get('data') or {}
  if 'mean' in data and 'std' in data:
    return tuple(data['mean']), tuple(data['std'])
  if config is not None:
    return tuple(config.data.mean), tuple(config.data.std)
  raise ValueError('the checkpoint metadata has no data mean/std; pass --config with the '
                   'config the model was trained with (its data.mean and data.std are used)')


def prior_target(depth: int, loss_config: Mapping | None) -> np.ndarray | None:
  """The distributional prior's target T [L] from config.loss, or None when unknown."""
  if not loss_config or 'prior_target_depth' not in loss_config:
    return None
  return np.asarray(losses.prior_target(depth, loss_config['prior_target_depth'],
                                        loss_config.get('prior_std', 1.0)))


# ---------------------------------------------------------------- images

def image_files(folder: str) -> list[str]:
  """Image files directly in `folder` (data.sources.IMAGE_EXTENSIONS), sorted by name."""
  from avit_jax.data.sources import IMAGE_EXTENSIONS  # local: loads tensorflow

  if not os.path.isdir(folder):
    raise FileNotFoundError(f'--image-folder {folder} is not a directory')
  files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                 if n.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {folder}')
  return files


def load_images(paths: Sequence[str], image_size: int, mean: Sequence[float],
                std: Sequence[float], in_chans: int = 3) -> np.ndarray:
  """Files -> normalised float32 [B, S, S, C]: shorter side to S (bicubic), centre crop."""
  from PIL import Image

  out = []
  for path in paths:
    try:
      with Image.open(path) as img:
        img = img.convert('RGB' if in_chans == 3 else 'L')
    except (OSError, ValueError) as e:
      raise ValueError(f'cannot read image {path}: {e}') from e
    scale = image_size / min(img.size)
    w, h = max(image_size, round(img.width * scale)), max(image_size, round(img.height * scale))
    if (w, h) != img.size:
      img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    pixels = np.asarray(img, np.float32).reshape(image_size, image_size, in_chans) / 255.0
    out.append((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
  return np.stack(out)


# ---------------------------------------------------------------- model outputs and figures

def run_model(model: AViT, images: np.ndarray, batch_size: int = 128) -> dict[str, np.ndarray]:
  """Outputs of the masked (training-graph) model in eval mode, batched, as numpy:
  token_depth [B, N], halting_scores [B, L, N], logits [B, C]. The model is not modified."""
  from avit_jax import inference# local: plotting from arrays must not need the model code

  predict = inference.make_predict_fn(model, 'masked' if model.halting else 'dense')
  images = np.asarray(images, np.float32)
  total = images.shape[0]
  size = min(batch_size, total)
  parts = []
  for start in range(0, total, size):
    chunk = images[start:start + size]
    pad = size - chunk.shape[0]  # pad the last chunk: one shape, one compilation
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out = predict(jnp.asarray(chunk))
    parts.append([np.asarray(a)[:size - pad]
                  for a in (out.token_depth, out.halting_scores, out.logits)])
  depth, scores, logits = (np.concatenate(p) for p in zip(*parts))
  return dict(token_depth=depth, halting_scores=scores, logits=logits)


def _label_text(label, class_names) -> str:
  return class_names[int(label)] if class_names else str(int(label))


def _safe(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_') or 'image'


def write_figures(outputs: Mapping[str, np.ndarray], display_images: np.ndarray, out_dir: str, *,
                  labels: np.ndarray | None = None, names: Sequence[str] | None = None,
                  class_names: Sequence[str] | None = None,
                  target: np.ndarray | None = None, num_maps: int = 8) -> list[str]:
  """Writes depth maps of the first `num_maps` images, the per-layer plots, the
  easiest/hardest grid and depths.npz (the arrays drawn) into out_dir; returns the paths.

  outputs: from `run_model`; display_images: float [B, H, W, C] in [0, 1].
  """
  depth_map_dir = os.path.join(out_dir, 'depth_maps')
  epath.Path(depth_map_dir).mkdir(parents=True, exist_ok=True)
  token_depth, scores = outputs['token_depth'], outputs['halting_scores']
  count, depth = scores.shape[0], scores.shape[1]
  predictions = np.argmax(outputs['logits'], -1) if 'logits' in outputs else None
  names = list(names) if names is not None else [f'image{i}' for i in range(count)]
  written = []
  for i in range(min(num_maps, count)):
    title = names[i]
    if labels is not None:
      title += f' - label {_label_text(labels[i], class_names)}'
      if predictions is not None:
        title += f', predicted {_label_text(predictions[i], class_names)}'
    fig, _ = plots.depth_map_figure(display_images[i], token_depth[i], depth, title=title)
    written.append(plots.save(fig, os.path.join(depth_map_dir, f'{i:03d}_{_safe(names[i])}.png')))

  stats = plots.layer_statistics(token_depth, scores)
  figures = {}
  if num_maps:
    shown = min(num_maps, count, 8)
    figures['depth_maps_grid.png'], _ = plots.depth_maps_grid_figure(
        display_images[:shown], token_depth[:shown], depth,
        titles=[_label_text(labels[i], class_names) if labels is not None else names[i]
                for i in range(shown)])
  figures.update({
      'active_tokens_per_layer.png': plots.active_tokens_figure(stats['active_fraction']),
      'halting_per_layer.png': plots.halting_figure(scores, token_depth, target),
      'token_depth_histogram.png': plots.depth_histogram_figure(token_depth, depth),
      'mean_depth_histogram.png': plots.mean_depth_histogram_figure(stats['mean_depth'], depth),
  })
  if count >= 2:
    figures['easiest_hardest.png'], _ = plots.easiest_hardest_figure(
        display_images, stats['mean_depth'], labels=labels, predictions=predictions,
        class_names=class_names)
  for name, fig in figures.items():
    written.append(plots.save(fig, os.path.join(out_dir, name)))
  if display_images.shape[1] == display_images.shape[2]:
    path = os.path.join(out_dir, 'content_depth.json')
    epath.Path(path).write_text(
        json.dumps(plots.content_depths(display_images, token_depth), indent=2))
    written.append(path)

  arrays = dict(token_depth=token_depth, halting_scores=scores, names=np.asarray(names),
                mean_depth=stats['mean_depth'], active_fraction=stats['active_fraction'])
  if labels is not None:
    arrays['labels'] = np.asarray(labels)
  if predictions is not None:
    arrays['predictions'] = predictions
  npz = os.path.join(out_dir, 'depths.npz')
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  epath.Path(npz).write_bytes(buffer.getvalue())
  written.append(npz)
  return written


def write_run_figures(model: AViT, images: np.ndarray, labels: np.ndarray | None, out_dir: str,
                      *, mean: Sequence[float], std: Sequence[float],
                      class_names: Sequence[str] | None = None,
                      loss_config: Mapping | None = None, num_maps: int = 8) -> list[str]:
  """Runs `model` on normalised images float32 [B, H, W, C] (labels int [B]) and writes its
  depth maps, per-layer plots and easiest/hardest grid into out_dir; returns the files.

  mean / std: the normalisation of `images` (undone for display). loss_config: config.loss,
  for the prior's target in the halting plot (omitted when None).
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f'expected images [B, H, W, C], got shape {images.shape}')
  outputs = run_model(model, images)
  target = prior_target(outputs['halting_scores'].shape[1], loss_config)
  display = plots.to_display(images, mean, std)
  names = [f'eval{i}' for i in range(images.shape[0])]
  return write_figures(outputs, display, out_dir, labels=None if labels is None else
                       np.asarray(labels), names=names, class_names=class_names, target=target,
                       num_maps=num_maps)


def write_training_figures(config: ml_collections.ConfigDict, workdir: str,
                           count: int = 64) -> list[str]:
  """The figures of a training run: its newest checkpoint on the first `count` images of
  the eval split, into WORKDIR/figures (what `python -m avit_jax.main` writes at the end).

  With several processes every one of them must call it (reading a checkpoint is collective
  in orbax); process 0 alone draws and writes, the others return [].
  """
  import jax

  model, _ = models.load(workdir)
  if jax.process_index() != 0:
    return []
  images, labels = pipeline.eval_images(config, count)
  out_dir = os.path.join(workdir, 'figures')
  files = write_run_figures(model, images, labels, out_dir, mean=config.data.mean,
                            std=config.data.std, class_names=CLASS_NAMES.get(config.data.source),
                            loss_config=config.loss.to_dict())
  logging.info('wrote %d figures under %s', len(files), out_dir)
  return files
