"""Token-depth maps and per-layer halting plots for a checkpoint and some images.

  python -m avit_jax.visualize --checkpoint WORKDIR_OR_STEP_DIR --out DIR \\
      [--images A.png B.jpg ... | --image-folder DIR | --config configs/x.py] [--num N]

Images given as files are resized and centre-cropped to the model's image size and
normalised with the data mean / std the checkpoint recorded. Without files, the first N
images of the eval split of the run's config are used: --config's (with any --config.a.b=value
overrides, as in avit_jax.main), else the workdir's config.json.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from avit_jax import command_line


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m avit_jax.visualize', description=__doc__.split('\n\n')[0],
      epilog='Any --config.a.b=value overrides the config file, as in avit_jax.main.')
  p.add_argument('--checkpoint', required=True,
                 help='checkpoint directory, or a training workdir (its latest step is used)')
  source = p.add_mutually_exclusive_group()
  source.add_argument('--images', nargs='+', metavar='FILE', help='image files')
  source.add_argument('--image-folder', metavar='DIR', help='every image file in DIR')
  p.add_argument('--config', help='config file (default: the workdir\'s config.json): data '
                 'mean / std fallback, prior target, and the eval split used without images')
  p.add_argument('--out', required=True, help='output directory for the PNGs')
  p.add_argument('--num', type=int, default=64, help='images to use at most (default 64)')
  p.add_argument('--num-maps', type=int, default=16,
                 help='per-image depth-map PNGs to write (default 16)')
  return p


def main(argv: Sequence[str] | None = None) -> list[str]:
  """Command-line entry; returns the files written."""
  parser = _parser()
  args, overrides = parser.parse_known_args(argv)
  bad = [a for a in overrides if not a.startswith('--config.')]
  if bad:
    parser.error(f'unrecognised arguments: {" ".join(bad)}')
  if overrides and not args.config:
    parser.error('--config.x=y overrides need --config')
  if args.num <= 0:
    parser.error(f'--num must be positive, got {args.num}')
  command_line.quiet_libraries()
  from avit_jax import checkpoints, models  # pylint: disable=import-outside-toplevel
  from avit_jax.analysis import figures, plots  # pylint: disable=import-outside-toplevel
  from avit_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  config = (command_line.load_config(args.config, overrides) if args.config
            else figures.workdir_config(args.checkpoint))
  if not (args.images or args.image_folder or config):
    parser.error('say which images: --images FILE..., --image-folder DIR, or --config CFG '
                 '(its eval split; a training workdir\'s own config.json is used when given)')
  # The architecture the checkpoint recorded; --config's model only for one that records none
  # (--config says which images and how to show them).
  step_dir = checkpoints.resolve_checkpoint(args.checkpoint)
  recorded = checkpoints.load_metadata(step_dir).get('model')
  model, metadata = models.load(step_dir, None if recorded or not config else config.model)
  mean, std = figures.data_stats(metadata, config)
  source = config.data.source if config else (metadata.get('data') or {}).get('source')
  labels = None
  if args.images or args.image_folder:
    files = (args.images or figures.image_files(args.image_folder))[:args.num]
    images = figures.load_images(files, model.image_size, mean, std, model.in_chans)
    names = [os.path.splitext(os.path.basename(f))[0] for f in files]
  else:
    images, labels = pipeline.eval_images(config, args.num)
    names = [f'{config.data.eval_split}{i}' for i in range(images.shape[0])]
  loss_config = config.loss.to_dict() if config else metadata.get('loss')
  outputs = figures.run_model(model, images)
  written = figures.write_figures(
      outputs, plots.to_display(images, mean, std), args.out, labels=labels, names=names,
      class_names=figures.CLASS_NAMES.get(source),
      target=figures.prior_target(model.depth, loss_config), num_maps=args.num_maps)
  summary = {'checkpoint': step_dir, 'images': len(names),
             'mean_token_depth': float(outputs['token_depth'].mean()), 'depth': model.depth}
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  written.append(os.path.join(args.out, 'summary.json'))
  print(f'wrote {len(written)} files to {args.out} (mean token depth '
        f'{summary["mean_token_depth"]:.2f} of {model.depth})')
  return written


if __name__ == '__main__':
  from avit_jax import checkpoints  # pylint: disable=ungrouped-imports
  try:
    main()
  except (checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
    # The message says what is wrong and how to fix it; a traceback would only hide it.
    raise SystemExit(f'error: {e}') from None
