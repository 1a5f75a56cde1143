"""What the commands share: the one loader of a config (a config file or a run's saved
config, then `--config.a.b=value` overrides), one line for a config file that is not there,
and the start-up chatter of TensorFlow, orbax, tfds and jax kept out of their output."""

from __future__ import annotations

import logging as std_logging
import os
import sys
import tempfile
from collections.abc import Sequence

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from avit_jax import config_lib


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


def load_config(source: str | ml_collections.ConfigDict, overrides: Sequence[str] = ()
                ) -> ml_collections.ConfigDict:
  """A config with `--config.a.b=value` overrides applied, parsed by ml_collections'
  config_flags exactly as on the command line.

  source: a config file (`configs/tiny.py`, with config_flags' optional `:argument`) whose
  get_config() is used, or a config (e.g. the config.json a training run saved).
  Raises FileNotFoundError for a missing file and ValueError for an unknown field, a value of
  the wrong type or an argument that is not an override, each with one line saying why.
  """
  values = flags.FlagValues()  # this call's own flags: nothing global is defined or parsed
  saved = isinstance(source, ml_collections.ConfigDict)
  if not saved and not os.path.isfile(source.partition(':')[0]):
    raise FileNotFoundError(f'config file {source} not found (expected a file such as '
                            'configs/tiny.py, relative to the current directory or absolute)')
  argv = ['avit_jax', *([] if saved else [f'--config={source}']), *overrides]
  try:
    # config_flags defines the override flags that sys_argv names, and only those.
    if saved:
      holder = config_flags.DEFINE_config_dict('config', source.copy_and_resolve_references(),
                                               flag_values=values, lock_config=False,
                                               sys_argv=argv)
    else:
      holder = config_flags.DEFINE_config_file('config', None, 'config file',
                                               flag_values=values, lock_config=False,
                                               sys_argv=argv)
    extra = values(argv)[1:]
  except (KeyError, AttributeError, flags.Error) as e:  # how config_flags refuses a bad one
    base = source if saved else load_config(source)
    raise ValueError(config_lib.unknown_override(base, argv, 'the saved config' if saved
                                                 else source) or str(e)) from None
  if extra:
    raise ValueError(f'unrecognised arguments {extra}: overrides are written '
                     '--config.field.sub=value')
  return holder.value


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(other arguments, `--config.a.b[=value]` overrides) of a command line; an override
  written `--config.a.b value` takes the next argument as its value."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith(('--config.', '--noconfig.')):
      rest.append(arg)
    elif '=' in arg or arg.startswith('--noconfig.') or i + 1 == len(argv) or (
        argv[i + 1].startswith('--')):
      overrides.append(arg)  # a value after '=', or a boolean flag
    else:
      overrides.append(f'{arg}={argv[i + 1]}')
      i += 1
    i += 1
  return rest, overrides


class QuietLibraries(std_logging.Filter):
  """Drops INFO records of orbax, tfds and jax's internals (warnings and errors pass)."""

  NOISY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/')

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in self.NOISY)


# Lines TensorFlow's C++ runtime writes straight to file descriptor 2 while it loads, before
# any Python logging exists to filter them: facts about the build, not about the run.
TENSORFLOW_START_UP = ('absl::InitializeLog()', 'oneDNN custom operations are on',
                       'cpu_feature_guard', 'rebuild TensorFlow with the appropriate compiler')


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow with its C++ start-up lines dropped; anything else it writes to
  stderr while loading is passed on."""
  if 'tensorflow' in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    captured.seek(0)
    for line in captured.read().decode(errors='replace').splitlines(keepends=True):
      if not any(part in line for part in TENSORFLOW_START_UP):
        sys.stderr.write(line)


def quiet_libraries() -> None:
  """Keeps library start-up chatter out of a command's output unless --verbosity asks for
  debug output: imports TensorFlow quietly and installs QuietLibraries on absl's handler."""
  if logging.get_verbosity() > logging.INFO:
    return
  import_tensorflow_quietly()
  handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())
