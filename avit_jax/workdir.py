"""The run directory: writable check, one run at a time, same config on resume, atomic JSON."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile

import ml_collections

from avit_jax import config_lib

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
# Fields a resumed run may change without becoming a different experiment.
RUN_CONTROL_FIELDS = frozenset({
    'mode', 'num_train_steps', 'num_epochs', 'log_every_steps', 'eval_every_steps',
    'checkpoint_every_steps', 'keep_checkpoints', 'eval_checkpoint', 'write_depth_maps',
    'num_eval_images', 'eval_batch_size', 'skip_nonfinite_steps', 'init_from'})
# Fields an evaluation may change on a trained model: the accuracy-compute dial (a gate
# centre or eps shifted at inference, docs/inference.md), not a different experiment.
INFERENCE_DIALS = frozenset({'model.gate_center', 'model.eps'})


class WorkdirError(RuntimeError):
  """A workdir that cannot be written, is in use, or holds a run with another config."""


def write_json(path: str, obj) -> None:
  """Writes JSON atomically (temp file + rename): readers never see a half-written file."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.json')
  with os.fdopen(fd, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def config_differences(saved: dict, current: dict, ignore=frozenset()) -> list[str]:
  """Fields (dotted) whose values differ, ignoring run-control fields and `ignore`."""
  a, b = config_lib.flatten(saved), config_lib.flatten(current)
  names = sorted(set(a) | set(b))
  return [f'{n}: workdir has {a.get(n, "<absent>")!r}, this run has {b.get(n, "<absent>")!r}'
          for n in names if n.split('.')[0] not in RUN_CONTROL_FIELDS and n not in ignore
          and a.get(n) != b.get(n)]


def _has_checkpoint(directory: str) -> bool:
  """Whether a finished checkpoint step (a numbered directory) exists: a run that stopped
  before its first checkpoint has nothing a different config could mix with."""
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


class Workdir:
  """Holds an exclusive lock on WORKDIR for the lifetime of a run (released on exit or crash)."""

  def __init__(self, path: str, config: ml_collections.ConfigDict, *, is_chief: bool = True):
    self.path = os.path.abspath(path)
    try:
      os.makedirs(self.path, exist_ok=True)
      probe = os.path.join(self.path, '.write-test')
      with open(probe, 'w') as f:
        f.write('ok')
      os.remove(probe)
    except OSError as e:
      raise WorkdirError(f'workdir {self.path} is not writable ({e.strerror}); choose a '
                         'directory you can write to with --workdir') from e
    self._lock = open(os.path.join(self.path, LOCK_FILE), 'a+')
    try:
      fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EAGAIN, errno.EACCES):
        self._lock.seek(0)
        owner = self._lock.read().strip() or 'unknown'
        self._lock.close()
        raise WorkdirError(f'another run (pid {owner}) is using workdir {self.path}; wait for '
                           'it to finish or use another --workdir') from e
      raise
    self._lock.seek(0)
    self._lock.truncate()
    self._lock.write(str(os.getpid()))
    self._lock.flush()
    self.config_path = os.path.join(self.path, CONFIG_FILE)
    current = json.loads(config.to_json_best_effort())
    evaluating = config.get('mode') == 'eval'
    if os.path.exists(self.config_path) and _has_checkpoint(os.path.join(self.path, 'checkpoints')):
      with open(self.config_path) as f:
        saved = json.load(f)
      diffs = config_differences(saved, current, INFERENCE_DIALS if evaluating else frozenset())
      if diffs:
        self.close()
        raise WorkdirError(f'workdir {self.path} holds a run with a different config:\n  '
                           + '\n  '.join(diffs) + '\nuse a new --workdir, or the same config '
                           'to resume that run')
    # An evaluation leaves the run's config as its training wrote it.
    if is_chief and not (evaluating and os.path.exists(self.config_path)):
      write_json(self.config_path, current)

  def close(self) -> None:
    """Releases the lock (also done by the OS when the process dies)."""
    if self._lock and not self._lock.closed:
      fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
      self._lock.close()

  def __enter__(self) -> Workdir:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
