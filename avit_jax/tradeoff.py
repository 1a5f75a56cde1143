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

from avit_jax import command_line

DEFAULT_SHIFTS = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)


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
  command_line.quiet_libraries()
  from avit_jax.analysis import tradeoff  # pylint: disable=import-outside-toplevel
  from avit_jax.training import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  config = tradeoff.run_config(args.checkpoint, overrides)
  plain = tradeoff.baseline_config(args.baseline, overrides) if args.baseline else None
  out = args.out or os.path.join(args.checkpoint, 'tradeoff')
  os.makedirs(out, exist_ok=True)
  rows = tradeoff.sweep(args.checkpoint, config, shifts, timing_batch=args.timing_batch,
                        reps=args.reps)
  baseline = None
  if plain is not None:
    baseline = tradeoff.baseline_row(args.baseline, plain, timing_batch=args.timing_batch,
                                     reps=args.reps)
    print(f'DeiT baseline: top-1 {100 * baseline["top1"]:.2f}%, GFLOPs '
          f'{baseline["gflops_per_image"]:.5f}, dense {baseline["images_per_s"]:.0f} img/s')
  result = dict(checkpoint=os.path.abspath(args.checkpoint), rows=rows, baseline=baseline,
                timing_batch=args.timing_batch)
  workdir_lib.write_json(os.path.join(out, 'tradeoff.json'), result)
  with open(os.path.join(out, 'tradeoff.md'), 'w') as f:
    f.write(tradeoff.markdown(rows, baseline))
  tradeoff.plot(rows, baseline, os.path.join(out, 'tradeoff.png'))
  print(f'wrote {out}/tradeoff.json, tradeoff.md, tradeoff.png')
  return result


if __name__ == '__main__':
  from avit_jax import checkpoints  # pylint: disable=ungrouped-imports
  try:
    main()
  except (checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
