"""What the absl commands (main, convert) share: one line for a config file that is not
there, and the INFO chatter of orbax, tfds and jax kept out of their output."""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import logging


def config_path(argv: list[str]) -> str | None:
  """The file named by --config (--config=FILE or --config FILE), without config_flags'
  ':argument' suffix; None when not given."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None and '--config' in argv[:-1]:
    path = argv[argv.index('--config') + 1]
  return path.partition(':')[0] if path else None


def check_config_file(argv: list[str]) -> None:
  """Exits with one line when --config names a file that does not exist (config_flags
  would print a page of traceback)."""
  path = config_path(argv)
  if path and not os.path.isfile(path):
    sys.exit(f'error: config file {path} not found (expected a file such as configs/tiny.py, '
             'relative to the current directory or absolute)')


class QuietLibraries(std_logging.Filter):
  """Drops INFO records of orbax, tfds and jax's internals (warnings and errors pass)."""

  NOISY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/')

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in self.NOISY)


def quiet_libraries() -> None:
  """Installs QuietLibraries on absl's handler (once)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())
