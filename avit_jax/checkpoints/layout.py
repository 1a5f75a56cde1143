"""Where checkpoints live and what goes wrong with them: the item names of a checkpoint
directory, the errors every reader raises, and finding the steps of a training workdir."""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import logging

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


def is_checkpoint(directory: str) -> bool:
  return os.path.isdir(os.path.join(directory, PARAMS))


def move_aside(directory: str) -> str:
  """Renames a damaged step directory to '<step>.corrupt-<n>' (never deletes): orbax only
  lists all-digit names, so the step is gone for the trainer but kept for inspection."""
  n = 1
  while os.path.exists(f'{directory}.corrupt-{n}'):
    n += 1
  os.rename(directory, f'{directory}.corrupt-{n}')
  return f'{directory}.corrupt-{n}'


def latest_step_dir(workdir: str) -> str:
  """The highest-numbered complete step directory WORKDIR/checkpoints/<step>/."""
  root = os.path.join(workdir, 'checkpoints')
  steps = []
  if os.path.isdir(root):
    # Only all-digit names: orbax writes '<step>.orbax-checkpoint-tmp-*' while saving.
    for n in os.listdir(root):
      if n.isdigit() and is_checkpoint(os.path.join(root, n)):
        steps.append(int(n))
      elif n.isdigit():
        logging.warning('skipping %s: it has no %s/ (damaged or incomplete; `%s %s` checks '
                        'every step)', os.path.join(root, n), PARAMS, VERIFY_COMMAND, workdir)
  if not steps:
    raise CheckpointError(
        f'no checkpoint under {root} (expected numeric step directories such as '
        f'{os.path.join(root, "1000")} written by `python -m avit_jax.main`); train first or '
        'name a checkpoint directory itself (e.g. --config.eval_checkpoint=DIR)')
  return os.path.join(root, str(max(steps)))


def resolve_checkpoint(path: str) -> str:
  """A checkpoint directory itself, or the latest step of a training workdir."""
  if is_checkpoint(path):
    return path
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return latest_step_dir(path)
  raise CheckpointError(
      f'{path} is neither a checkpoint (a directory with params/) nor a training workdir '
      '(a directory with checkpoints/<step>/)')
