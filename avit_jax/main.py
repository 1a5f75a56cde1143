"""Command line: `python -m avit_jax.main --config configs/tiny.py --workdir DIR [--config.x=y]`.

Parses flags, starts multi-host JAX when asked, calls train.train_and_evaluate, and then
writes the run's figures (config.write_depth_maps) with avit_jax.visualize.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from avit_jax import command_line, config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for checkpoints, logs and eval.json')
_MODE = flags.DEFINE_enum('mode', None, ['train', 'eval'], 'overrides config.mode')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for multi-host runs (jax.distributed)')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes (multi-host)')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process (multi-host)')
_INIT_TIMEOUT = flags.DEFINE_integer(
    'initialization_timeout', 300, 'seconds a process waits for the others to join (multi-host)')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', 100, 'seconds without word from a process after which JAX stops the '
    'others (multi-host: a dead host ends the run instead of hanging it)')
flags.mark_flags_as_required(['config', 'workdir'])
# Exit status after SIGTERM (128 + 15, as if killed by it): the run is unfinished, so
# `main ... && next_step` does not go on; rerun the same command to resume.
EXIT_PREEMPTED = 143


def _check_override_names(argv: list[str]) -> None:
  """Exits naming an unknown --config.field and the nearest valid ones."""
  path = command_line.config_path(argv)
  if not path or not os.path.exists(path):
    return
  config = flags.FLAGS['config'].parser.parse(path)  # config_flags' own loader
  message = config_lib.unknown_override(config, argv, path)
  if message:
    sys.exit(f'error: {message}')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing (its one-line errors and exit status 1), with one line for a missing
  config file and a better message for an unknown --config.field, which config_flags
  refuses with a KeyError / AttributeError."""
  command_line.check_config_file(argv)
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError):
    _check_override_names(argv)
    raise


def main(argv) -> None:
  command_line.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from avit_jax import distributed
  try:  # before anything starts a JAX backend
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           initialization_timeout=_INIT_TIMEOUT.value,
                           heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
  except distributed.DistributedError as e:
    sys.exit(f'error: {e}')
  import jax

  from avit_jax import checkpoints, train, validation, workdir

  config = _CONFIG.value
  if _MODE.value:
    with config.unlocked():
      config.mode = _MODE.value
  try:  # Config mistakes: one line naming field, value and fix, before anything compiles.
    validation.validate_config(config)
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
  except (workdir.WorkdirError, checkpoints.CheckpointError, train.NonFiniteLossError,
          FileNotFoundError) as e:
    # The user's to fix (see the message; conversion errors are CheckpointErrors, missing
    # data FileNotFoundErrors); a traceback would only hide it. Printed once, on stderr.
    sys.exit(f'error: {e}')
  if config.mode == 'train' and config.write_depth_maps and config.model.halting:
    from avit_jax import visualize
    visualize.write_training_figures(config, _WORKDIR.value)


def run() -> None:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
