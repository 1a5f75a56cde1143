"""Command line: `python -m avit_jax.main --config configs/tiny.py --workdir DIR [--config.x=y]`.

Parses flags, starts multi-host JAX when asked, and calls train.train_and_evaluate.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for checkpoints, logs and eval.json')
_MODE = flags.DEFINE_enum('mode', None, ['train', 'eval'], 'overrides config.mode')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for multi-host runs (jax.distributed)')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes (multi-host)')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process (multi-host)')
flags.mark_flags_as_required(['config', 'workdir'])
# Exit status after SIGTERM (128 + 15, as if killed by it): the run is unfinished, so
# `main ... && next_step` does not go on; rerun the same command to resume.
EXIT_PREEMPTED = 143


def _maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when flags or the environment (TPU pod, SLURM) say so."""
  import jax

  if _COORDINATOR.value:
    if (_NUM_PROCESSES.value or 1) > 1 and jax.default_backend() == 'cpu':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif any(k in os.environ for k in ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID',
                                      'JAX_COORDINATOR_ADDRESS')):
    jax.distributed.initialize()


def _check_override_names(argv: list[str]) -> None:
  """A mistyped --config.field names the field and the nearest valid ones, before parsing."""
  config_path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if config_path is None and '--config' in argv:
    config_path = argv[argv.index('--config') + 1]
  if not config_path or not os.path.exists(config_path):
    return
  path, _, arg = config_path.partition(':')
  spec = importlib.util.spec_from_file_location('_avit_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  valid = set(_flat_names(config))
  for arg in argv:
    if arg.startswith('--config.'):
      name = arg[len('--config.'):].split('=', 1)[0]
      if name not in valid:
        close = difflib.get_close_matches(name, sorted(valid), n=3, cutoff=0.5)
        hint = f'; did you mean {", ".join(close)}?' if close else ''
        sys.exit(f'error: unknown config field {name!r}{hint} (valid fields are listed in '
                 f'{config_path}; see avit_jax/config_lib.py)')


def _flat_names(config, prefix=''):
  for key, value in config.items():
    name = f'{prefix}{key}'
    if hasattr(value, 'items'):
      yield from _flat_names(value, name + '.')
    else:
      yield name


class _QuietLibraries:
  """Drops INFO chatter of orbax and tfds from the log (warnings and errors still pass)."""

  NOISY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/')

  def filter(self, record) -> bool:
    import logging as std_logging

    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in self.NOISY)


def main(argv) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _maybe_initialize_distributed()
  import jax

  from avit_jax import checkpoints, config_lib, train, workdir

  config = _CONFIG.value
  if _MODE.value:
    with config.unlocked():
      config.mode = _MODE.value
  try:  # Config mistakes: one line naming field, value and fix, before anything compiles.
    config_lib.validate(config)
  except (ValueError, TypeError) as e:
    sys.exit(f'error: {e}')
  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(EXIT_PREEMPTED)
  except (workdir.WorkdirError, checkpoints.CheckpointError, train.NonFiniteLossError) as e:
    # The user's to fix (see the message; conversion errors are CheckpointErrors); a
    # traceback would only hide it.
    logging.error('%s', e)
    sys.exit(f'error: {e}')


def run() -> None:
  _check_override_names(sys.argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main)


if __name__ == '__main__':
  run()
