"""Token-depth maps and per-layer halting plots for a checkpoint and some images.

  python -m avit_jax.visualize --checkpoint WORKDIR_OR_STEP_DIR --out DIR \
      [--images A.png B.jpg ... | --image-folder DIR | --config configs/x.py] [--num N]

Images given as files are resized (shorter side, bicubic) and centre-cropped to the
model's image size, then normalised with the data mean / std stored in the checkpoint's
metadata (or --config's). With --config and no files, the first N images of the
configured eval split are used; `--config.a.b=value` overrides work as in avit_jax.main
(both are parsed by ml_collections' config_flags).
The drawing itself lives in avit_jax/plots.py; this module loads, runs the model and writes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from avit_jax import checkpoints, config_lib, losses, plots
from avit_jax import workdir as workdir_lib

if TYPE_CHECKING:
  from avit_jax.models import AViT

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
CLASS_NAMES = {'fashion_mnist': FASHION_MNIST_CLASSES}


# ---------------------------------------------------------------- checkpoints and config

def load_model(checkpoint: str,
               model_config: ml_collections.ConfigDict | None = None) -> tuple[AViT, dict]:
  """(model, metadata) from a checkpoint or a training workdir (its newest step).

  model: an AViT in eval mode holding the checkpoint's parameters, its architecture from
  metadata['model'] (`model_config` is used only when the checkpoint carries none).
  metadata: the checkpoint's metadata dict ('model', and 'data' with the normalisation
  mean / std, 'loss', 'source' where the writer recorded them).
  """
  from avit_jax import models  # local: plotting from arrays must not need the model code

  step_dir = checkpoints.resolve_checkpoint(checkpoint)
  params, metadata = checkpoints.load_params(step_dir)
  if 'model' in metadata:
    model_config = ml_collections.ConfigDict(metadata['model'])
  elif model_config is None:
    raise checkpoints.CheckpointError(
        f'{step_dir} has no model metadata; pass --config with the config it was trained with')
  model = models.create(model_config)
  checkpoints.assign_params(model, params, what=step_dir)
  return model, metadata


def workdir_config(checkpoint: str) -> ml_collections.ConfigDict | None:
  """The config.json of the training run `checkpoint` belongs to (a workdir, or one of its
  steps WORKDIR/checkpoints/<step>), or None when there is none."""
  path = epath.Path(checkpoint)
  return workdir_lib.saved_config(path) or workdir_lib.saved_config(path.parent.parent)


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """get_config() of a config file, then `--config.a.b=value` overrides: parsed by
  ml_collections' config_flags, exactly as `python -m avit_jax.main` parses them."""
  if not os.path.isfile(path.partition(':')[0]):
    raise FileNotFoundError(f'config file {path} not found (expected e.g. configs/tiny.py)')
  argv = ['visualize', f'--config={path}', *overrides]
  values = flags.FlagValues()  # this call's own flags: nothing global is defined or parsed
  config = config_flags.DEFINE_config_file('config', None, 'config file', flag_values=values,
                                           lock_config=False, sys_argv=argv)
  try:
    extra = values(argv)[1:]
  except (KeyError, AttributeError):  # how config_flags refuses an unknown field
    raise ValueError(config_lib.unknown_override(values['config'].parser.parse(path), argv,
                                                 path)) from None
  except flags.Error as e:  # a value that does not parse as the field's type
    raise ValueError(str(e)) from None
  if extra:
    raise ValueError(f'unrecognised arguments {extra}: overrides are written '
                     '--config.field.sub=value')
  return config.value


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
  """Image files directly in `folder` (data_sources.IMAGE_EXTENSIONS), sorted by name."""
  from avit_jax.data_sources import IMAGE_EXTENSIONS  # local: loads tensorflow

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


def eval_split_images(config: ml_collections.ConfigDict, num: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `num` images and labels of the configured eval split (padding dropped)."""
  from avit_jax import input_pipeline  # local: only this path needs the data code

  config = config.copy_and_resolve_references()
  config.num_eval_images = num
  images, labels, have = [], [], 0
  for batch in input_pipeline.eval_iterator(config):
    keep = np.asarray(batch['mask']) > 0
    images.append(np.asarray(batch['images'], np.float32)[keep])
    labels.append(np.asarray(batch['labels'])[keep])
    have += int(keep.sum())
    if have >= num:
      break
  if not have:
    raise ValueError(f'the eval split {config.data.eval_split!r} of {config.data.source!r} '
                     'gave no images')
  return np.concatenate(images)[:num], np.concatenate(labels)[:num]


# ---------------------------------------------------------------- model outputs and figures

def run_model(model: AViT, images: np.ndarray, batch_size: int = 128) -> dict[str, np.ndarray]:
  """Outputs of the masked (training-graph) model in eval mode, batched, as numpy:
  token_depth [B, N], halting_scores [B, L, N], logits [B, C]. The model is not modified."""
  from avit_jax import inference  # local: plotting from arrays must not need the model code

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

  model, _ = load_model(workdir)
  if jax.process_index() != 0:
    return []
  images, labels = eval_split_images(config, count)
  out_dir = os.path.join(workdir, 'figures')
  files = write_run_figures(model, images, labels, out_dir, mean=config.data.mean,
                            std=config.data.std, class_names=CLASS_NAMES.get(config.data.source),
                            loss_config=config.loss.to_dict())
  logging.info('wrote %d figures under %s', len(files), out_dir)
  return files


# ---------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m avit_jax.visualize', description=__doc__.split('\n\n')[0],
      epilog='Any --config.a.b=value overrides the config file, as in avit_jax.main.')
  p.add_argument('--checkpoint', required=True,
                 help='checkpoint directory, or a training workdir (its latest step is used)')
  source = p.add_mutually_exclusive_group()
  source.add_argument('--images', nargs='+', metavar='FILE', help='image files')
  source.add_argument('--image-folder', metavar='DIR', help='every image file in DIR')
  p.add_argument('--config', help='config file: data mean/std fallback, prior target, and the '
                 'eval split used when no images are given')
  p.add_argument('--out', required=True, help='output directory for the PNGs')
  p.add_argument('--num', type=int, default=64, help='images to use at most (default 64)')
  p.add_argument('--num-maps', type=int, default=16,
                 help='per-image depth-map PNGs to write (default 16)')
  return p


def main(argv: Sequence[str] | None = None) -> list[str]:
  """Command-line entry; returns the files written."""
  parser = _parser()
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.')]
  if bad:
    parser.error(f'unrecognised arguments: {" ".join(bad)}')
  if rest and not args.config:
    parser.error('--config.x=y overrides need --config')
  if args.num <= 0:
    parser.error(f'--num must be positive, got {args.num}')
  config = load_config(args.config, rest) if args.config else workdir_config(args.checkpoint)
  if not (args.images or args.image_folder or config):
    parser.error('say which images: --images FILE..., --image-folder DIR, or --config CFG '
                 '(its eval split; a training workdir\'s own config.json is used when given)')
  model, metadata = load_model(args.checkpoint, config.model if config else None)
  mean, std = data_stats(metadata, config)
  source = config.data.source if config else (metadata.get('data') or {}).get('source')
  class_names = CLASS_NAMES.get(source)
  labels = None
  if args.images or args.image_folder:
    files = (args.images or image_files(args.image_folder))[:args.num]
    images = load_images(files, model.image_size, mean, std, model.in_chans)
    names = [os.path.splitext(os.path.basename(f))[0] for f in files]
  else:
    images, labels = eval_split_images(config, args.num)
    names = [f'{config.data.eval_split}{i}' for i in range(images.shape[0])]
  loss_config = config.loss.to_dict() if config else metadata.get('loss')
  outputs = run_model(model, images)
  written = write_figures(outputs, plots.to_display(images, mean, std), args.out, labels=labels,
                          names=names, class_names=class_names,
                          target=prior_target(model.depth, loss_config), num_maps=args.num_maps)
  summary = {'checkpoint': checkpoints.resolve_checkpoint(args.checkpoint), 'images': len(names),
             'mean_token_depth': float(outputs['token_depth'].mean()), 'depth': model.depth}
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  written.append(os.path.join(args.out, 'summary.json'))
  print(f'wrote {len(written)} files to {args.out} (mean token depth '
        f'{summary["mean_token_depth"]:.2f} of {model.depth})')
  return written


if __name__ == '__main__':
  try:
    main()
  except (checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
    # The message says what is wrong and how to fix it; a traceback would only hide it.
    raise SystemExit(f'error: {e}') from None
