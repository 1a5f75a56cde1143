"""Checks a data set-up: `python -m avit_jax.input_pipeline --config configs/fashion_mnist.py`
prints the sizes of the config's splits and the shapes of one train batch, after the same
checks a run makes. `--bench` times the train and eval pipelines; `--prepare_imagenet DIR`
builds tfds imagenet2012 into config.data.data_dir from the archives in DIR.

The pipeline itself is avit_jax.data.pipeline.
"""

from __future__ import annotations

import sys

import ml_collections
from absl import app, flags

from avit_jax import command_line


def _define_flags() -> None:
  # Only when run as a command: importing this module must not register global flags.
  flags.DEFINE_string('config', None, 'config file, e.g. configs/fashion_mnist.py; any '
                      '--config.a.b=value after it overrides a field')
  flags.DEFINE_bool('bench', False, 'print images/s of the train and eval pipelines')
  flags.DEFINE_integer('bench_batches', 50, 'batches timed per pipeline')
  flags.DEFINE_string('prepare_imagenet', None, 'MANUAL_DIR holding ILSVRC2012_img_train.tar '
                      'and ILSVRC2012_img_val.tar: build tfds imagenet2012 into '
                      'config.data.data_dir')
  flags.mark_flags_as_required(['config'])


_OVERRIDES: list[str] = []  # the --config.a.b=value arguments, set by _parse_flags


def _parse_flags(argv: list[str]) -> list[str]:
  rest, _OVERRIDES[:] = command_line.split_overrides(argv)
  return app.parse_flags_with_usage(rest)


def data_check(config: ml_collections.ConfigDict, *, prepare_imagenet: str | None = None,
               bench: bool = False, bench_batches: int = 50) -> None:
  """The command's work: prepare ImageNet, time the pipelines, or print split sizes and the
  shapes of a train batch (after the config's checks)."""
  from avit_jax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
  from avit_jax.training import validation  # pylint: disable=import-outside-toplevel

  if prepare_imagenet:
    print('prepared', sources.prepare_imagenet(config, prepare_imagenet))
    return
  validation.validate_config(config, device_count=1)  # batch sizes: checked by the run
  if bench:
    for name, rate in pipeline.benchmark(config, bench_batches).items():
      print(f'{name}: {rate:,.0f} images/s ({config.data.source}, image_size '
            f'{config.model.image_size})')
    return
  for split in (config.data.train_split, config.data.eval_split):
    print(f'{config.data.source}/{split}: {pipeline.num_examples(config, split)} examples')
  batch = next(pipeline.train_iterator(config))
  print({k: (v.shape, v.dtype.name) for k, v in batch.items()})


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:  # The user's to fix: one line, as `python -m avit_jax.main` prints it.
    f = flags.FLAGS
    config = command_line.load_config(f.config, _OVERRIDES)
    command_line.quiet_libraries()
    data_check(config, prepare_imagenet=f.prepare_imagenet, bench=f.bench,
               bench_batches=f.bench_batches)
  except (ValueError, TypeError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
