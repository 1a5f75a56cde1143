"""Command line: `python -m avit_jax.main --config configs/tiny.py --workdir DIR [--config.x=y]`.

Parses flags, starts multi-host JAX when asked, calls train.train_and_evaluate, and then
writes the run's figures (config.write_depth_maps) with avit_jax.analysis.figures.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from avit_jax import command_line

_CONFIG = flags.DEFINE_string('config', None, 'config file, e.g. configs/tiny.py; any '
                              '--config.a.b=value after it overrides a field')
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


_OVERRIDES: list[str] = []  # the --config.a.b=value arguments, set by _parse_flags


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing (its one-line errors and exit status 1) of everything but the config
  overrides, which command_line.load_config applies."""
  rest, _OVERRIDES[:] = command_line.split_overrides(argv)
  return app.parse_flags_with_usage(rest)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    config = command_line.load_config(_CONFIG.value, _OVERRIDES)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  command_line.quiet_libraries()
  from avit_jax import distributed
  try:  # before anything starts a JAX backend
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           initialization_timeout=_INIT_TIMEOUT.value,
                           heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
  except distributed.DistributedError as e:
    sys.exit(f'error: {e}')
  import jax

  from avit_jax import checkpoints, config_lib
  from avit_jax.training import train, workdir

  if _MODE.value:
    config.mode = _MODE.value
  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(EXIT_PREEMPTED)
  except (config_lib.ConfigError, workdir.WorkdirError, checkpoints.CheckpointError,
          train.NonFiniteLossError, FileNotFoundError) as e:
    # The user's to fix (see the message; config mistakes are found before anything
    # compiles, conversion errors are CheckpointErrors, missing data FileNotFoundErrors); a
    # traceback would only hide it. Printed once, on stderr.
    sys.exit(f'error: {e}')
  if config.mode == 'train' and config.write_depth_maps and config.model.halting:
    from avit_jax.analysis import figures
    figures.write_training_figures(config, _WORKDIR.value)


def run() -> None:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
