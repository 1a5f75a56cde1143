"""Accuracy against compute for one trained A-ViT, without retraining.

  python -m avit_jax.tradeoff --checkpoint WORKDIR [--baseline DEIT_WORKDIR] [--out DIR]
      [--shifts=-4,-2,-1,0,1,2,4] [--timing-batch 64] [--config.x=y ...]

Shifting the gate centre beta of a trained model at inference moves every token's halting:
h = sigmoid(gamma * y0 - (beta + shift)), so a negative shift halts tokens earlier (less
compute), a positive one later (a large one runs every token through every layer: plain
DeiT). For each shift this evaluates the eval split of the run's config (WORKDIR/config.json,
with any --config.x=y overrides) with the masked model (top-1, the GFLOPs the halting uses:
multiply-accumulates) and times the token-removal mode 'compact' and 'dense' on
`--timing-batch` eval images. With --baseline (a plain-DeiT run, model.halting=False) its
top-1 and speed are measured the same way and marked. Writes OUT/tradeoff.json,
OUT/tradeoff.md and OUT/tradeoff.png (top-1 against GFLOPs and against images/s).
To use a shift: `python -m avit_jax.main --mode eval --config.model.gate_center=BETA ...`
(BETA = the trained gate centre + shift), or a model built with that gate_center for
inference.make_predict_fn.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from avit_jax import (checkpoints, evaluation, flops, inference, input_pipeline, models,
                      workdir as workdir_lib)
from avit_jax.benchmark import measure

DEFAULT_SHIFTS = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)


def run_config(directory: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config a training run saved (WORKDIR/config.json) with `--config.a.b=value`
  overrides, parsed by ml_collections' config_flags as avit_jax.main parses them."""
  config = workdir_lib.saved_config(directory)
  if config is None:
    raise FileNotFoundError(f'{os.path.join(directory, workdir_lib.CONFIG_FILE)} not found: '
                            'expected a training workdir (it holds the config.json its run '
                            'wrote)')
  values = flags.FlagValues()  # this call's own flags: nothing global is defined or parsed
  holder = config_flags.DEFINE_config_dict('config', config, flag_values=values,
                                           lock_config=False)
  values(['tradeoff', *overrides])
  return holder.value


def read_checkpoint(directory: str) -> tuple[str, dict]:
  """(step directory, parameters) of the newest checkpoint of a workdir or of a step
  directory; read and verified once, however many models are built from it."""
  step_dir = checkpoints.resolve_checkpoint(directory)
  return step_dir, checkpoints.load_params(step_dir)[0]


def build_model(step_dir: str, params: dict, model_config: ml_collections.ConfigDict
                ) -> models.AViT:
  """A model of model_config holding `params` (read from step_dir), in eval mode."""
  model = models.create(model_config)
  checkpoints.assign_params(model, params, what=step_dir)
  return model


def load_model(directory: str, model_config: ml_collections.ConfigDict) -> models.AViT:
  """The newest checkpoint of a workdir (or a step directory) in a model of model_config."""
  return build_model(*read_checkpoint(directory), model_config)


def evaluate(model: models.AViT, config: ml_collections.ConfigDict, *, mode: str) -> dict:
  """Exact eval-split metrics of `model` run in `mode` (evaluation.evaluate)."""
  predict = inference.make_predict_fn(model, mode)
  model_config = config.model
  sums = jax.jit(lambda out, labels, mask: evaluation.eval_sums(out, labels, mask, model_config))
  batches = input_pipeline.eval_iterator(config)
  return evaluation.evaluate(
      lambda b: sums(predict(jnp.asarray(b['images'])), b['labels'], b['mask']), batches,
      num_tokens=models.num_tokens(model_config), dense_gflops=flops.dense_gflops(model_config))


def images_per_second(model: models.AViT, images: np.ndarray, modes: Sequence[str],
                      reps: int) -> dict:
  """Round-robin images/s of each mode on one batch."""
  x = jnp.asarray(images)
  fns = {mode: (lambda p=inference.make_predict_fn(model, mode): p(x)) for mode in modes}
  return {mode: len(images) / s for mode, s in measure.time_round_robin(fns, reps).seconds.items()}


def shifted(model_config: ml_collections.ConfigDict, shift: float) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(model_config.to_dict())
  config.gate_center = float(model_config.gate_center) + float(shift)
  return config


def sweep(directory: str, config: ml_collections.ConfigDict, shifts: Sequence[float], *,
          timing_batch: int = 64, reps: int = 3, log=print) -> list[dict]:
  """One row per shift: top-1, GFLOPs used, compute fraction, mean depth, images/s."""
  if not config.model.halting:
    raise ValueError(f'{directory} is a plain DeiT (model.halting=False): nothing to shift; '
                     'pass it as --baseline')
  timing_images = _first_images(config, timing_batch)
  step_dir, params = read_checkpoint(directory)
  rows = []
  for shift in shifts:
    model_config = shifted(config.model, shift)
    model = build_model(step_dir, params, model_config)
    metrics = evaluate(model, _with_model(config, model_config), mode='masked')
    speed = images_per_second(model, timing_images, ('dense', 'compact'), reps)
    row = dict(shift=float(shift), gate_center=model_config.gate_center,
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
  model = load_model(directory, config.model)
  metrics = evaluate(model, config, mode='dense')
  speed = images_per_second(model, _first_images(config, timing_batch), ('dense',), reps)
  return dict(name='DeiT', top1=metrics['top1'], gflops_per_image=metrics['gflops_per_image'],
              images_per_s=speed['dense'])


def _with_model(config, model_config):
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = model_config
  return config


def _first_images(config, count: int) -> np.ndarray:
  images = []
  for batch in input_pipeline.eval_iterator(config):
    images.append(batch['images'][batch['mask'] > 0])
    if sum(len(i) for i in images) >= count:
      break
  return np.concatenate(images)[:count]


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


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog='python -m avit_jax.tradeoff',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='the A-ViT training workdir')
  parser.add_argument('--baseline', default='', help='a plain-DeiT training workdir to mark')
  parser.add_argument('--out', default='', help='output directory (default WORKDIR/tradeoff)')
  parser.add_argument('--shifts', default=','.join(f'{s:g}' for s in DEFAULT_SHIFTS))
  parser.add_argument('--timing-batch', type=int, default=64)
  parser.add_argument('--reps', type=int, default=3)
  args, overrides = parser.parse_known_args(argv)
  bad = [a for a in overrides if not a.startswith('--config.')]
  if bad:
    parser.error(f'unrecognised arguments: {" ".join(bad)}')
  try:
    shifts = [float(s) for s in args.shifts.split(',') if s]
  except ValueError:
    shifts = []
  if not shifts:
    parser.error(f'--shifts must be numbers separated by commas, got {args.shifts!r}')
  config = run_config(args.checkpoint, overrides)
  plain = baseline_config(args.baseline, overrides) if args.baseline else None
  out = args.out or os.path.join(args.checkpoint, 'tradeoff')
  os.makedirs(out, exist_ok=True)
  rows = sweep(args.checkpoint, config, shifts, timing_batch=args.timing_batch, reps=args.reps)
  baseline = None
  if plain is not None:
    baseline = baseline_row(args.baseline, plain, timing_batch=args.timing_batch,
                            reps=args.reps)
    print(f'DeiT baseline: top-1 {100 * baseline["top1"]:.2f}%, GFLOPs '
          f'{baseline["gflops_per_image"]:.5f}, dense {baseline["images_per_s"]:.0f} img/s')
  result = dict(checkpoint=os.path.abspath(args.checkpoint), rows=rows, baseline=baseline,
                timing_batch=args.timing_batch)
  workdir_lib.write_json(os.path.join(out, 'tradeoff.json'), result)
  with open(os.path.join(out, 'tradeoff.md'), 'w') as f:
    f.write(markdown(rows, baseline))
  plot(rows, baseline, os.path.join(out, 'tradeoff.png'))
  print(f'wrote {out}/tradeoff.json, tradeoff.md, tradeoff.png')
  return result


if __name__ == '__main__':
  try:
    main()
  except (checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
