"""The run directory: writable check, one run at a time, same config on resume, atomic JSON.

A run of many processes has one workdir, owned by process 0: it alone locks it and writes
`config.json`; every process checks a resumed config and that all processes were started
with the same config. Paths go through etils.epath, so a workdir may be local or a
`gs://bucket/dir` URL (docs/training.md says what holds on each).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile

import ml_collections
from etils import epath

from avit_jax import config_lib, distributed

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
# Fields a resumed run may change without becoming a different experiment (the mesh too:
# a run may resume on another number of devices or hosts).
RUN_CONTROL_FIELDS = frozenset({
    'mode', 'mesh', 'num_train_steps', 'num_epochs', 'log_every_steps', 'eval_every_steps',
    'checkpoint_every_steps', 'keep_checkpoints', 'eval_checkpoint', 'write_depth_maps',
    'num_eval_images', 'eval_batch_size', 'skip_nonfinite_steps', 'init_from'})
# Fields an evaluation may change on a trained model without evaluating another experiment:
# the accuracy-compute dial (a gate centre or eps shifted at inference, docs/inference.md),
# the images it is measured on, and the checkpoint. An evaluation that changes any of them
# writes its metrics under evals/, never over the run's own eval.json.
EVAL_OVERRIDES = ('model.gate_center', 'model.eps', 'data.eval_split', 'num_eval_images',
                  'eval_checkpoint')
EVAL_FILE = 'eval.json'
EVALS_DIR = 'evals'


class WorkdirError(RuntimeError):
  """A workdir that cannot be written, is in use, or holds a run with another config."""


def is_local(path: str | os.PathLike) -> bool:
  """Whether `path` is on a local (POSIX) file system rather than a URL such as gs://."""
  return '://' not in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
  """A local path made absolute; a URL (gs://...) as it is."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else path


def write_json(path: str | os.PathLike, obj) -> None:
  """Writes JSON so that readers never see a half-written file: on a local disk a temp file
  renamed over the target; on object stores (gs://) one object write, which is atomic.
  Makes the directory it goes in."""
  text = json.dumps(obj, indent=2, sort_keys=True)
  if not is_local(path):
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_text(text)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.json')
  with os.fdopen(fd, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def saved_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict | None:
  """The config a training run wrote to WORKDIR/config.json, or None when there is none."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    return None
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def config_differences(saved: dict, current: dict, ignore=frozenset()) -> list[str]:
  """Fields (dotted) whose values differ, ignoring run-control fields and `ignore`. A field
  one side lacks (a config saved before the field existed) counts as its default."""
  a, b = config_lib.flatten(saved), config_lib.flatten(current)
  defaults = config_lib.flatten(config_lib.base_config())
  value = lambda side, n: side.get(n, defaults.get(n, '<absent>'))
  names = sorted(set(a) | set(b))
  return [f'{n}: workdir has {value(a, n)!r}, this run has {value(b, n)!r}'
          for n in names if n.split('.')[0] not in RUN_CONTROL_FIELDS and n not in ignore
          and value(a, n) != value(b, n)]


def _has_checkpoint(directory: epath.Path) -> bool:
  """Whether a finished checkpoint step (a numbered directory) exists: a run that stopped
  before its first checkpoint has nothing a different config could mix with."""
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


class Workdir:
  """A run's directory, held for the lifetime of the run.

  Training: process 0 (`is_chief`) makes it, takes an exclusive lock on a local disk
  (released on exit or crash) and writes config.json; the other processes of the same run
  take no lock. Evaluation (config.mode == 'eval') only reads it: no lock (it may run beside
  a training run), no config.json, no directory made. Collective when the run has several
  processes: all of them construct it, and an error found by any one (another run holds the
  workdir, a different config) stops all of them with the same message.
  """

  def __init__(self, path: str | os.PathLike, config: ml_collections.ConfigDict, *,
               is_chief: bool = True):
    self.path = resolve(path)
    self.config_path = os.path.join(self.path, CONFIG_FILE)
    self._lock = None
    current = json.loads(config.to_json_best_effort())
    # Every process must have been started with the same config: a host with other
    # overrides would train another model on its share of the batch. Checked before the
    # workdir is touched.
    digest = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).digest()
    if not distributed.same_on_all(digest):
      raise WorkdirError('the processes of this run were started with different configs; '
                         'give every process the same --config and --config.* flags')
    evaluating = config.get('mode') == 'eval'
    chief_error = local_error = None
    try:
      if is_chief and not evaluating:
        self._make_writable()
        self._take_lock()
      local_error = self._check_config(current, evaluating)
      if is_chief and not evaluating and local_error is None:
        write_json(self.config_path, current)
    except WorkdirError as e:
      local_error = str(e)
    if is_chief:
      chief_error = local_error
    chief_error = distributed.message_from_chief(chief_error)
    ok = distributed.agree(local_error is None)
    if chief_error or not ok:
      self.close()
      raise WorkdirError(chief_error or local_error or f'another process of this run refused '
                         f'workdir {self.path} (its log says why)')

  def _make_writable(self) -> None:
    try:
      root = epath.Path(self.path)
      root.mkdir(parents=True, exist_ok=True)
      probe = root / '.write-test'
      probe.write_text('ok')
      probe.unlink()
    except OSError as e:
      raise WorkdirError(f'workdir {self.path} is not writable ({e.strerror or e}); choose a '
                         'directory you can write to with --workdir') from e

  def _take_lock(self) -> None:
    """An flock on WORKDIR/.lock on a local disk; object stores (gs://) have no lock."""
    if not is_local(self.path):
      return
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

  def _check_config(self, current: dict, evaluating: bool) -> str | None:
    """The differences from the config of a run already checkpointed here, as a message."""
    saved_path = epath.Path(self.config_path)
    if not (saved_path.exists() and _has_checkpoint(epath.Path(self.path) / 'checkpoints')):
      return None
    saved = json.loads(saved_path.read_text())
    diffs = config_differences(saved, current,
                               frozenset(EVAL_OVERRIDES) if evaluating else frozenset())
    if not diffs:
      return None
    return (f'workdir {self.path} holds a run with a different config:\n  '
            + '\n  '.join(diffs) + '\nuse a new --workdir, or the same config to resume that run')

  def evaluation_file(self, config: ml_collections.ConfigDict, step: int) -> tuple[str, dict]:
    """(path, overrides) for the metrics of an evaluation of checkpoint `step`.

    WORKDIR/eval.json, the run's own result, only for the plain re-evaluation of the run's
    config while no training run holds the workdir; otherwise
    WORKDIR/evals/step_<step>[-<field>=<value>...].json, named for the fields that differ
    from the run's config.json (overrides: {field: value}).
    """
    saved_path = epath.Path(self.config_path)
    overrides = {}
    if saved_path.exists():
      saved = config_lib.flatten(json.loads(saved_path.read_text()))
      current = config_lib.flatten(json.loads(config.to_json_best_effort()))
      overrides = {name: current.get(name) for name in EVAL_OVERRIDES
                   if current.get(name) != saved.get(name)}
    if not overrides and not self.training_elsewhere():
      return os.path.join(self.path, EVAL_FILE), {}
    suffix = ''.join(f'-{name}={value}' for name, value in overrides.items()
                     if name != 'eval_checkpoint')
    name = re.sub(r'[^\w.=+-]', '_', f'step_{step}{suffix}') + '.json'
    return os.path.join(self.path, EVALS_DIR, name), overrides

  def training_elsewhere(self) -> bool:
    """Whether a training run holds this workdir's lock now (local disks; False on gs://)."""
    lock_path = os.path.join(self.path, LOCK_FILE)
    if not is_local(self.path) or not os.path.exists(lock_path):
      return False
    with open(lock_path) as f:
      try:  # a shared lock is refused only while a run holds its exclusive one
        fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
          return True
        raise
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False

  def close(self) -> None:
    """Releases the lock (also done by the OS when the process dies)."""
    if self._lock and not self._lock.closed:
      fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
      self._lock.close()

  def __enter__(self) -> Workdir:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
