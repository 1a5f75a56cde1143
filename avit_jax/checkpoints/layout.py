"""Where checkpoints live and what goes wrong with them: the item names of a checkpoint
directory, the errors every reader raises, and finding the steps of a training workdir.

Paths go through etils.epath (orbax's own path layer), so a directory may be local or a URL
such as gs://bucket/run; functions take and return str.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import logging
from etils import epath

from avit_jax.checkpoints import integrity

PARAMS = 'params'
METADATA = 'metadata'
ARRAY_ITEMS = (PARAMS, 'opt_state', 'ema_params')
JSON_ITEMS = (METADATA, 'train')
VERIFY_COMMAND = 'python -m avit_jax.checkpoints verify'


class CheckpointError(ValueError):
  """A checkpoint that is missing, incomplete, or does not fit the model."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint with a file that cannot be read or an array that differs from its
  checksum. `problems`: one line each, naming the file or array."""

  def __init__(self, directory: str, problems: Sequence[str], advice: str = ''):
    self.directory = directory
    self.problems = list(problems)
    super().__init__(f'checkpoint {directory} is damaged: {integrity.summary(self.problems)}.'
                     + (f' {advice}' if advice else ''))


def is_url(path: str) -> bool:
  """Whether `path` names a remote file system (gs://bucket/..., s3://...)."""
  return '://' in str(path)


def absolute(path: str) -> str:
  """`path` as messages name it: a local path made absolute, a URL as written (normalised)."""
  return str(epath.Path(path)) if is_url(path) else os.path.abspath(path)


def join(directory: str, *names: str) -> str:
  """`directory`/`names`..., for a local path or a URL alike."""
  return str(epath.Path(directory).joinpath(*names))


def is_checkpoint(directory: str) -> bool:
  return (epath.Path(directory) / PARAMS).is_dir()


def move_aside(directory: str) -> str:
  """Renames a damaged step directory to '<step>.corrupt-<n>' (never deletes): orbax only
  lists all-digit names, so the step is gone for the trainer but kept for inspection."""
  n = 1
  while epath.Path(f'{directory}.corrupt-{n}').exists():
    n += 1
  epath.Path(directory).rename(f'{directory}.corrupt-{n}')
  return f'{directory}.corrupt-{n}'


def latest_step_dir(workdir: str) -> str:
  """The highest-numbered complete step directory WORKDIR/checkpoints/<step>/."""
  root = join(workdir, 'checkpoints')
  steps = []
  if epath.Path(root).is_dir():
    # Only all-digit names: orbax writes '<step>.orbax-checkpoint-tmp-*' while saving.
    for n in (p.name for p in epath.Path(root).iterdir()):
      if n.isdigit() and is_checkpoint(join(root, n)):
        steps.append(int(n))
      elif n.isdigit():
        logging.warning('skipping %s: it has no %s/ (damaged or incomplete; `%s %s` checks '
                        'every step)', join(root, n), PARAMS, VERIFY_COMMAND, workdir)
  if not steps:
    raise CheckpointError(
        f'no checkpoint under {root} (expected numeric step directories such as '
        f'{join(root, "1000")} written by `python -m avit_jax.main`); train first or '
        'name a checkpoint directory itself (e.g. --config.eval_checkpoint=DIR)')
  return join(root, str(max(steps)))


def resolve_checkpoint(path: str) -> str:
  """A checkpoint directory itself, or the latest step of a training workdir."""
  if is_checkpoint(path):
    return path
  if (epath.Path(path) / 'checkpoints').is_dir():
    return latest_step_dir(path)
  if not epath.Path(path).exists():
    raise CheckpointError(f'checkpoint {path} does not exist (expected a directory written by '
                          'avit_jax.convert, a trainer step WORKDIR/checkpoints/<step>, or a '
                          'training workdir)')
  raise CheckpointError(
      f'{path} is neither a checkpoint (a directory with params/) nor a training workdir '
      '(a directory with checkpoints/<step>/)')
