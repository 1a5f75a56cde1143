"""Accuracy against compute of one trained A-ViT, without retraining: its gate centre
shifted at inference (the library of `python -m avit_jax.tradeoff`, whose doc says more).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avit_jax import checkpoints, command_line, inference, models
from avit_jax.benchmark import measure
from avit_jax.data import pipeline
from avit_jax.models import flops
from avit_jax.training import evaluation
from avit_jax.training import workdir as workdir_lib



def run_config(directory: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config a training run saved (WORKDIR/config.json) with `--config.a.b=value`
  overrides (command_line.load_config)."""
  config = workdir_lib.saved_config(directory)
  if config is None:
    raise FileNotFoundError(f'{os.path.join(directory, workdir_lib.CONFIG_FILE)} not found: '
                            'expected a training workdir (it holds the config.json its run '
                            'wrote)')
  return command_line.load_config(config, overrides)


def metrics_in_mode(model: models.AViT, config: ml_collections.ConfigDict, *, mode: str) -> dict:
  """Exact eval-split metrics of `model` run in `mode` (evaluation.evaluate)."""
  predict = inference.make_predict_fn(model, mode)
  model_config = config.model
  sums = jax.jit(lambda out, labels, mask: evaluation.eval_sums(out, labels, mask, model_config))
  batches = pipeline.eval_iterator(config)
  return evaluation.evaluate(
      lambda b: sums(predict(jnp.asarray(b['images'])), b['labels'], b['mask']), batches,
      num_tokens=models.num_tokens(model_config), dense_gflops=flops.dense_gflops(model_config))


def images_per_second(model: models.AViT, images: np.ndarray, modes: Sequence[str],
                      reps: int) -> dict:
  """Round-robin images/s of each mode on one batch."""
  x = jnp.asarray(images)
  fns = {mode: (lambda p=inference.make_predict_fn(model, mode): p(x)) for mode in modes}
  return {mode: len(images) / s for mode, s in measure.time_round_robin(fns, reps).seconds.items()}


def sweep(directory: str, config: ml_collections.ConfigDict, shifts: Sequence[float], *,
          timing_batch: int = 64, reps: int = 3, log=print) -> list[dict]:
  """One row per shift: top-1, GFLOPs used, compute fraction, mean depth, images/s."""
  if not config.model.halting:
    raise ValueError(f'{directory} is a plain DeiT (model.halting=False): nothing to shift; '
                     'pass it as --baseline')
  timing_images, _ = pipeline.eval_images(config, timing_batch)
  model, _ = models.load(directory, config.model)  # read and verified once for every shift
  rows = []
  for shift in shifts:
    # The gate centre is a constant of the model's graph: each predictor made after this
    # compiles for the new value, with the same parameters.
    model.gate_center = float(config.model.gate_center) + float(shift)
    metrics = metrics_in_mode(model, config, mode='masked')
    speed = images_per_second(model, timing_images, ('dense', 'compact'), reps)
    row = dict(shift=float(shift), gate_center=model.gate_center,
               top1=metrics['top1'], gflops_per_image=metrics['gflops_per_image'],
               compute_fraction=metrics['compute_fraction'],
               mean_token_depth=metrics['mean_token_depth'],
               images_per_s=speed['compact'], dense_images_per_s=speed['dense'])
    log(format_row(row))
    rows.append(row)
  return rows


def baseline_config(directory: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of a plain-DeiT training run with a checkpoint, checked before any work: a
  missing workdir or an A-ViT run is refused (FileNotFoundError / ValueError)."""
  try:
    config = run_config(directory, overrides)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'--baseline: {e}; train one with `python -m avit_jax.main '
                            '--config CONFIG --workdir DIR --config.model.halting=False`') from e
  if config.model.halting:
    raise ValueError(f'--baseline {directory} is an A-ViT run (model.halting=True); the '
                     'baseline is plain DeiT trained by the same recipe with '
                     '--config.model.halting=False')
  checkpoints.resolve_checkpoint(directory)
  return config


def baseline_row(directory: str, config: ml_collections.ConfigDict, *, timing_batch: int,
                 reps: int) -> dict:
  """Top-1, GFLOPs and images/s (dense) of a plain-DeiT run (config: `baseline_config`)."""
  model, _ = models.load(directory, config.model)
  metrics = metrics_in_mode(model, config, mode='dense')
  images, _ = pipeline.eval_images(config, timing_batch)
  speed = images_per_second(model, images, ('dense',), reps)
  return dict(name='DeiT', top1=metrics['top1'], gflops_per_image=metrics['gflops_per_image'],
              images_per_s=speed['dense'])


def format_row(row: dict) -> str:
  return (f'shift {row["shift"]:+6.2f} (gate centre {row["gate_center"]:6.2f}): top-1 '
          f'{100 * row["top1"]:6.2f}%  GFLOPs {row["gflops_per_image"]:.5f} '
          f'({100 * row["compute_fraction"]:5.1f}% of dense)  depth {row["mean_token_depth"]:.2f}'
          f'  compact {row["images_per_s"]:8.0f} img/s  (dense {row["dense_images_per_s"]:.0f})')


def markdown(rows: list[dict], baseline: dict | None) -> str:
  lines = ['| shift | gate centre | top-1 | GFLOPs/img | compute | mean depth | compact img/s '
           '| dense img/s |', '|---|---|---|---|---|---|---|---|']
  lines += [f'| {r["shift"]:+g} | {r["gate_center"]:g} | {100 * r["top1"]:.2f}% | '
            f'{r["gflops_per_image"]:.5f} | {100 * r["compute_fraction"]:.0f}% | '
            f'{r["mean_token_depth"]:.2f} | {r["images_per_s"]:.0f} | '
            f'{r["dense_images_per_s"]:.0f} |' for r in rows]
  if baseline:
    lines.append(f'| DeiT (no halting) | - | {100 * baseline["top1"]:.2f}% | '
                 f'{baseline["gflops_per_image"]:.5f} | 100% | - | - | '
                 f'{baseline["images_per_s"]:.0f} |')
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], baseline: dict | None, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  top1 = [100 * r['top1'] for r in rows]
  for ax, key, label in ((axes[0], 'gflops_per_image', 'GFLOPs per image (multiply-adds)'),
                         (axes[1], 'images_per_s', 'images/s (compact, measured)')):
    xs = [r[key] for r in rows]
    ax.plot(xs, top1, 'o-', color='tab:blue', label='A-ViT, gate centre shifted')
    for r, x, y in zip(rows, xs, top1):
      ax.annotate(f'{r["shift"]:+g}', (x, y), textcoords='offset points', xytext=(4, -10),
                  fontsize=8)
    if baseline:
      ax.plot([baseline[key]], [100 * baseline['top1']], '*', color='tab:red', markersize=12,
              label='DeiT (same recipe)')
    ax.set_xlabel(label)
    ax.set_ylabel('top-1 (%)')
    ax.grid(alpha=0.3)
  axes[0].legend(loc='lower right', fontsize=8)
  fig.suptitle('One trained model, its gate centre shifted at inference')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
