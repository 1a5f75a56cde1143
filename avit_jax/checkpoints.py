"""Orbax checkpoints: parameter checkpoints (conversion, init_from, eval) and the trainer's
CheckpointManager with resume. Builds no model.

Layout shared by every writer, so any of them can be read by `load_params`:
  DIR/params/         orbax StandardCheckpointer tree: nested dict of float32 numpy arrays
                      with the model's nnx attribute paths (timm names).
  DIR/metadata/       orbax JSON: {'model': config.model as a dict, 'source': ...,
                      'checksums': crc32, dtype and shape of every saved array, ...}
A trainer step directory WORKDIR/checkpoints/<step>/ has the same two items plus the
optimizer state, so `init_from` and evaluation accept either kind of directory.

Every read is verified (checkpoint_integrity.py): the JSON files it needs must parse and the
arrays must match the checksums recorded when they were written; a checkpoint that fails
raises DamagedCheckpointError. Checkpoints written before checksums load with a warning.
`python -m avit_jax.checkpoints verify DIR` checks a checkpoint or every step of a workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from avit_jax import checkpoint_integrity as integrity
from avit_jax import config_lib

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


def save_params(directory: str, params: dict, metadata: dict, *, force: bool = False) -> str:
  """Writes a parameter checkpoint; refuses to overwrite an existing one unless `force`.

  params: nested dict of arrays; metadata: JSON-serialisable dict (the arrays' checksums
  are added to it). Returns the directory.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory):
    if not force:
      raise FileExistsError(f'{directory} exists and is not empty; pass --force to replace it '
                            'or choose another --out directory')
  params = jax.tree.map(np.asarray, params)
  metadata = {**metadata, integrity.FIELD: integrity.checksum_field({PARAMS: params})}
  # Orbax writes into a temporary directory and renames it on success, so a crash
  # mid-write never leaves a half-written checkpoint under `directory`.
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(directory, ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        METADATA: ocp.args.JsonSave(metadata),
    }), force=force)
  return directory


def load_params(directory: str) -> tuple[dict, dict]:
  """Reads (params, metadata) from a parameter checkpoint or a trainer step directory, after
  checking the files it reads and the parameters' checksums (DamagedCheckpointError, naming
  the newest intact step of the workdir when there is one)."""
  directory = os.path.abspath(directory)
  if not is_checkpoint(directory):
    hint = ''
    if os.path.isdir(os.path.join(directory, 'checkpoints')):
      hint = (f' It looks like a training workdir: point at one of its steps, e.g. '
              f'{os.path.join(directory, "checkpoints", "<step>")}.')
    raise CheckpointError(f'{directory} is not an avit_jax checkpoint (expected a '
                          f'{PARAMS}/ subdirectory written by avit_jax.convert or the trainer).'
                          + hint)
  try:
    return _read_params(directory)
  except DamagedCheckpointError as e:
    raise DamagedCheckpointError(directory, e.problems, _advice(directory)) from e


def _read_params(directory: str, *, warn: bool = True) -> tuple[dict, dict]:
  problems = integrity.json_problems(directory, (PARAMS, METADATA))
  if problems:
    raise DamagedCheckpointError(directory, problems)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restore = lambda args: checkpointer.restore(directory, args)
    metadata = _read_metadata(directory, restore)
    params = _restore_item(directory, restore, PARAMS,
                           ocp.args.StandardRestore(fallback_sharding=_host_sharding()))
  params = jax.tree.map(np.asarray, params)
  _verify(directory, metadata, {PARAMS: params}, warn=warn)
  metadata.pop(integrity.FIELD, None)  # the readers' business only
  return params, metadata


def _advice(directory: str) -> str:
  """What to do about a damaged checkpoint: another step of its workdir, or rewriting it."""
  root, name = os.path.split(directory)
  if not (name.isdigit() and os.path.basename(root) == 'checkpoints'):
    return (f'Write it again (e.g. `python -m avit_jax.convert ... --force`) or restore it from '
            f'a copy; `{VERIFY_COMMAND} {directory}` lists what is wrong.')
  workdir = os.path.dirname(root)
  for step in sorted((int(n) for n in os.listdir(root) if n.isdigit() and int(n) < int(name)),
                     reverse=True):
    try:
      _read_params(os.path.join(root, str(step)), warn=False)
    except CheckpointError:
      continue
    return (f'The newest earlier step whose parameters verify is {step}: evaluate it with '
            f'--config.eval_checkpoint={os.path.join(root, str(step))}; a training run on this '
            f'workdir moves step {name} aside and resumes from the newest intact step. '
            f'`{VERIFY_COMMAND} {workdir}` checks every step.')
  return (f'No earlier step of {workdir} has parameters that verify; retrain (a new --workdir) '
          f'or restore the workdir from a copy. `{VERIFY_COMMAND} {workdir}` checks every step.')


def _host_sharding() -> jax.sharding.Sharding:
  """Where a checkpoint saved on another device layout is restored: one host (CPU) device.
  Without it orbax refuses a checkpoint written on, e.g., 8 devices in a 1-device process."""
  try:
    device = jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    device = jax.local_devices()[0]
  return jax.sharding.SingleDeviceSharding(device)


def _reason(error: BaseException) -> str:
  """An exception as one line: type and first line of each message down its chain, less
  orbax's wrapper around TensorStore reads (its cause names the array and file) and
  TensorStore's JSON spec."""
  parts, seen = [], set()
  while error is not None and id(error) not in seen and len(parts) < 2:
    seen.add(id(error))
    lines = str(error).strip().splitlines()
    text = lines[0].split(' [tensorstore_spec=')[0][:400] if lines else '(no message)'
    cause = error.__cause__ or error.__context__
    if not (text.startswith('Encountered error while reading array index') and cause):
      parts.append(f'{type(error).__name__}: {text}')
    error = cause
  return ' <- '.join(parts)


def _silence_abandoned_reads() -> None:
  """Drops, process-wide, the noise of orbax's abandoned array reads (once installed, stays).

  Orbax's array reader catches BaseException around each TensorStore read and raises anew,
  so every read a failed restore leaves pending prints 'Exception ignored in: <coroutine
  _read_array_index_and_device_put>' and a page of TensorStore spec whenever it is
  collected, and a read finishing after orbax closed its event loop prints 'RuntimeError:
  Event loop is closed': after (and burying) the clear error. Only these two are dropped;
  any other unraisable goes to the previous hook."""
  if getattr(sys.unraisablehook, 'avit_jax_filter', False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    name = getattr(unraisable.object, '__qualname__', '')
    abandoned = name == '_read_array_index_and_device_put'
    late = (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed')
    if not (abandoned or late):
      previous(unraisable)
  hook.avit_jax_filter = True
  sys.unraisablehook = hook


def _restore_item(directory: str, restore: Callable[[ocp.args.Composite], Any], name: str,
                  args) -> Any:
  """One item of a step through `restore` (a Checkpointer's or the manager's); any failure
  to read it becomes a DamagedCheckpointError naming the item."""
  if not os.path.isdir(os.path.join(directory, name)):
    raise DamagedCheckpointError(directory, [f'{name}/ is missing'])
  try:
    return restore(ocp.args.Composite(**{name: args}))[name]
  except Exception as e:  # orbax, TensorStore and json raise many types: all mean unreadable
    _silence_abandoned_reads()
    raise DamagedCheckpointError(directory, [f'{name}/ cannot be read ({_reason(e)})']) from e


def _listed_items(directory: str) -> set[str]:
  """The items the step's _CHECKPOINT_METADATA says it holds (empty when unreadable)."""
  try:
    with open(os.path.join(directory, '_CHECKPOINT_METADATA')) as f:
      return set(json.load(f).get('item_handlers') or ())
  except (OSError, ValueError, AttributeError):
    return set()


def _read_metadata(directory: str, restore) -> dict:
  """The metadata item; {} for a checkpoint written without one (none of this repository's
  writers does that, but older ones may have)."""
  if not os.path.isdir(os.path.join(directory, METADATA)):
    if METADATA in _listed_items(directory):
      raise DamagedCheckpointError(directory, [f'{METADATA}/ is missing (the checkpoint '
                                               'lists it in _CHECKPOINT_METADATA)'])
    return {}
  metadata = _restore_item(directory, restore, METADATA, ocp.args.JsonRestore())
  if not isinstance(metadata, dict):
    raise DamagedCheckpointError(directory, [f'{METADATA}/metadata holds '
                                             f'{type(metadata).__name__}, not a JSON object'])
  return dict(metadata)


def _verify(directory: str, metadata: dict, trees: Mapping[str, Any], *, warn: bool = True,
            complete: bool = False) -> int:
  """Compares restored array items with metadata's checksums; returns how many arrays were
  checked (0 for a checkpoint written before checksums, with a warning). `complete`: every
  item with recorded checksums must be among `trees` (a full check of a step)."""
  field = metadata.get(integrity.FIELD)
  if field is None:
    if warn:
      logging.warning('%s has no array checksums (written before avit_jax recorded them): '
                      'its arrays are used unverified', directory)
    return 0
  arrays = field.get('arrays') if isinstance(field, dict) else None
  if not isinstance(arrays, dict) or field.get('algorithm') != integrity.ALGORITHM:
    raise DamagedCheckpointError(directory, [
        f'{METADATA}/metadata: "{integrity.FIELD}" is not a record of this format (expected '
        f'algorithm {integrity.ALGORITHM!r} and per-item arrays)'])
  problems = []
  for item, tree in trees.items():
    if item not in arrays:
      problems.append(f'{item}: no checksums were recorded for it')
    else:
      problems += integrity.compare(item, tree, arrays[item])
  if complete:
    problems += [f'{item}/: checksums were recorded for it, but it is not in the checkpoint'
                 for item in sorted(set(arrays) - set(trees))]
  if problems:
    raise DamagedCheckpointError(directory, problems)
  return sum(len(arrays[item]) for item in trees)


@dataclasses.dataclass(frozen=True)
class StepCheck:
  """The outcome of `check_step`: problems (empty: intact) and how many arrays matched."""
  directory: str
  problems: list[str]
  arrays_verified: int

  @property
  def ok(self) -> bool:
    return not self.problems


def check_step(directory: str) -> StepCheck:
  """Reads every item of a checkpoint directory (parameter checkpoint or trainer step) and
  compares every array with its checksum; never raises for a damaged checkpoint."""
  directory = os.path.abspath(directory)
  if not is_checkpoint(directory):
    return StepCheck(directory, [f'{PARAMS}/ is missing: not a complete checkpoint'], 0)
  present = {n for n in ARRAY_ITEMS + JSON_ITEMS if os.path.isdir(os.path.join(directory, n))}
  items = sorted(present | (_listed_items(directory) & set(ARRAY_ITEMS + JSON_ITEMS)))
  try:
    problems = integrity.json_problems(directory, tuple(items))
    if problems:
      raise DamagedCheckpointError(directory, problems)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      restore = lambda args: checkpointer.restore(directory, args)
      metadata = _read_metadata(directory, restore)
      trees = {n: jax.tree.map(np.asarray, _restore_item(
          directory, restore, n, ocp.args.StandardRestore(fallback_sharding=_host_sharding())))
               for n in ARRAY_ITEMS if n in items}
      if 'train' in items:
        _check_train(directory, _restore_item(directory, restore, 'train',
                                              ocp.args.JsonRestore()))
    return StepCheck(directory, [], _verify(directory, metadata, trees, warn=False,
                                            complete=True))
  except DamagedCheckpointError as e:
    return StepCheck(directory, e.problems, 0)


def _check_train(directory: str, train: Any) -> dict:
  """The trainer's JSON item: a dict whose step is the directory's."""
  name = os.path.basename(directory)
  if not isinstance(train, dict) or (name.isdigit() and train.get('step') != int(name)):
    raise DamagedCheckpointError(directory, [
        f'train/metadata holds {train!r:.80}, expected {{"step": {name}, ...}}'])
  return dict(train)


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


def misfit_message(header: str, expected: Mapping[str, Any], found: Mapping[str, Any], *,
                   label: Callable[[str], str] = str,
                   unknown_names: Sequence[str] = ()) -> str | None:
  """What makes parameters not fit a model, as an error message; None when they fit.

  expected / found: flat {name: array (or anything with a shape)}, in whatever naming the
  message should use. Lists mis-shaped, missing and unexpected names with their shapes
  (`label` may add where a name came from; `unknown_names` are source names that map to
  nothing), and a hint when the architecture read off the names differs.
  """
  shape = lambda a: tuple(np.shape(a))
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  mismatched = [f'{label(k)}: model {shape(expected[k])} vs checkpoint {shape(found[k])}'
                for k in sorted(set(expected) & set(found))
                if shape(expected[k]) != shape(found[k])]
  if not (missing or unexpected or mismatched or unknown_names):
    return None
  lines = [header]
  if mismatched:
    lines.append('  shape mismatches: ' + '; '.join(mismatched))
  if missing:
    lines.append('  missing from the checkpoint: ' + ', '.join(
        f'{k} {shape(expected[k])}' for k in missing))
  if unexpected or unknown_names:
    lines.append('  not in the model: ' + ', '.join(
        [f'{label(k)} {shape(found[k])}' for k in unexpected] + sorted(unknown_names)))
  hint = _geometry_hint(_geometry(expected), _geometry(found))
  if hint:
    lines.append(hint)
  return '\n'.join(lines)


def _geometry(flat: Mapping[str, Any]) -> dict[str, int]:
  """Architecture read off parameter names and shapes: depth and width (dim) in any naming,
  patch and num_classes from native names; a long list of mismatches usually comes down to
  one of these."""
  geometry = {}
  blocks = {int(k.split('.')[1]) for k in flat if re.match(r'blocks\.\d+\.', k)}
  if blocks:
    geometry['depth'] = max(blocks) + 1
  if 'cls_token' in flat:
    geometry['dim'] = int(np.shape(flat['cls_token'])[-1])
  if 'patch_embed.proj.kernel' in flat:
    geometry['patch'] = int(np.shape(flat['patch_embed.proj.kernel'])[0])
  if 'head.kernel' in flat:
    geometry['num_classes'] = int(np.shape(flat['head.kernel'])[-1])
  return geometry


def _geometry_hint(model: dict[str, int], found: dict[str, int]) -> str | None:
  """'hint: the checkpoint has depth 3 and width 192; ... --config.model.depth=3 ...' when
  the geometries differ: depth and width always (they name the variant), others if they differ."""
  differ = [k for k in model if found.get(k) not in (None, model[k])]
  if not differ:
    return None
  named = [k for k in ('depth', 'dim') if k in found] + [
      k for k in ('patch', 'num_classes') if k in differ]
  parts = [f'{"width" if k == "dim" else k} {found[k]}' for k in named]
  text = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
  return (f'  hint: the checkpoint has {text}; choose the matching config or override, e.g. '
          + ' '.join(f'--config.model.{k}={found[k]}' for k in named))


def metadata_json(model_config) -> dict:
  """config.model as plain JSON values (tuples -> lists)."""
  return json.loads(model_config.to_json())


def assign_params(model, params: Mapping, what: str = 'checkpoint') -> None:
  """Copies parameters (a nested or flat dict of arrays) into the nnx model after checking
  names and shapes; raises CheckpointError listing what does not fit."""
  template = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat = config_lib.flatten(params)
  message = misfit_message(f'{what} does not fit the model:', config_lib.flatten(template), flat)
  if message:
    raise CheckpointError(message)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, nest_like(template, flat))
  nnx.update(model, state)


def nest_like(template, flat: Mapping[str, Any]):
  """Flat {'a.b': array} (every name of `template`) -> float32 arrays nested like `template`."""
  name = lambda path: jax.tree_util.keystr(path, simple=True, separator='.')
  return jax.tree_util.tree_map_with_path(
      lambda path, _: np.asarray(flat[name(path)], np.float32), template)


class TrainCheckpoints:
  """The trainer's orbax CheckpointManager under WORKDIR/checkpoints.

  Each step directory holds `params` and `metadata` (so `load_params` reads it), plus
  `opt_state`, `ema_params` and `train` (JSON: step, epoch, seed, skipped steps). Keeps the
  last `keep` steps and the best by eval top-1; saves asynchronously. Saves record every
  array's checksum; `restore_latest` verifies them and falls back past damaged steps.

  Multi-host (untested; every run so far is one process): every process reads and
  verifies, process 0 alone moves damaged steps aside, and arrays sharded across processes
  are checked for dtype and shape only (checkpoint_integrity.py).
  """

  ITEMS = (PARAMS, METADATA, 'opt_state', 'ema_params', 'train')

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    from orbax.checkpoint import checkpoint_managers

    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m['top1'], n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, *, params, opt_state, ema_params, train: dict, metadata: dict,
           metrics: dict | None = None) -> None:
    """Saves `step` asynchronously, once (a step already saved is left as it is).

    params / ema_params: nnx.State or nested dicts of arrays; opt_state: optax state. The
    checksums are taken here, from host copies of these very arrays, before the write starts.
    """
    if step in self.manager.all_steps():
      return
    to_pure = lambda s: nnx.to_pure_dict(s) if isinstance(s, nnx.State) else s
    arrays = {PARAMS: to_pure(params), 'opt_state': opt_state, 'ema_params': to_pure(ema_params)}
    metadata = {**metadata, integrity.FIELD: integrity.checksum_field(arrays)}
    items = {
        PARAMS: ocp.args.StandardSave(arrays[PARAMS]),
        METADATA: ocp.args.JsonSave(metadata),
        'opt_state': ocp.args.StandardSave(opt_state),
        'train': ocp.args.JsonSave(train),
    }
    if ema_params is not None:
      items['ema_params'] = ocp.args.StandardSave(arrays['ema_params'])
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore_latest(self, *, abstract_params, abstract_opt_state,
                     abstract_ema=None) -> dict | None:
    """The newest intact step restored onto abstract pytrees (ShapeDtypeStructs carrying
    shardings), or None when there is none yet. The one place a training step is read.

    A step that cannot be read or fails its checksums is logged and, once an older step
    restores intact, moved aside (`move_aside`); when no step is intact, nothing is moved
    and CheckpointError lists what was tried.

    abstract_params / abstract_ema: pure nested dicts. Returns {'params', 'opt_state',
    'ema_params' (None without EMA), 'train' (JSON: step, epoch, seed, nonfinite_steps)}.
    """
    damaged: list[DamagedCheckpointError] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self._restore_step(step, abstract_params, abstract_opt_state, abstract_ema)
      except DamagedCheckpointError as e:
        logging.error('cannot resume from step %d: %s', step, e)
        damaged.append(e)
        continue
      if damaged:
        for e in damaged:
          if jax.process_index() == 0:
            logging.warning('moved damaged checkpoint %s to %s (kept for inspection; delete '
                            'it when done)', e.directory, move_aside(e.directory))
        self.manager.reload()  # forget the moved steps: a new save of that step may follow
        logging.warning('resuming from step %d, the newest intact checkpoint', step)
      return restored
    if damaged:
      tried = '\n'.join(f'  step {os.path.basename(e.directory)}: '
                        f'{integrity.summary(e.problems)}' for e in damaged)
      raise CheckpointError(
          f'no intact checkpoint to resume from under {self.directory}; tried:\n{tried}\n'
          'Nothing was moved or deleted. To start this run over, move the damaged steps out '
          f'of {self.directory}, or train in a new --workdir (--config.init_from=<a '
          'checkpoint> starts from its parameters); '
          f'`{VERIFY_COMMAND} {os.path.dirname(self.directory)}` checks every step.')
    return None

  def _restore_step(self, step: int, abstract_params, abstract_opt_state,
                    abstract_ema) -> dict:
    directory = self.step_dir(step)
    names = (PARAMS, METADATA, 'opt_state', 'train') + (('ema_params',) if abstract_ema else ())
    problems = integrity.json_problems(directory, names)
    if problems:
      raise DamagedCheckpointError(directory, problems)
    restore = lambda args: self.manager.restore(step, args=args)
    metadata = _read_metadata(directory, restore)
    trees = {PARAMS: _restore_item(directory, restore, PARAMS,
                                   ocp.args.StandardRestore(abstract_params)),
             'opt_state': _restore_item(directory, restore, 'opt_state',
                                        ocp.args.StandardRestore(abstract_opt_state))}
    if abstract_ema is not None:
      trees['ema_params'] = _restore_item(directory, restore, 'ema_params',
                                          ocp.args.StandardRestore(abstract_ema))
    train = _check_train(directory, _restore_item(directory, restore, 'train',
                                                  ocp.args.JsonRestore()))
    _verify(directory, metadata, trees)
    return {'params': trees[PARAMS], 'opt_state': trees['opt_state'],
            'ema_params': trees.get('ema_params'), 'train': train}

  def last_good_step(self) -> int | None:
    """The newest step that passes `check_step` (after pending saves finish), or None."""
    self.manager.wait_until_finished()
    for step in sorted(self.manager.all_steps(), reverse=True):
      if check_step(self.step_dir(step)).ok:
        return step
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# --- python -m avit_jax.checkpoints verify DIR ----------------------------------------------

def _directories_to_check(path: str) -> tuple[list[str], list[str]]:
  """(checkpoint directories under `path`, notes on entries that are not checked): `path`
  itself when it is a checkpoint, else every step of a workdir (or of its checkpoints/)."""
  path = os.path.abspath(path)
  if is_checkpoint(path):
    return [path], []
  root = os.path.join(path, 'checkpoints')
  if not os.path.isdir(root) and os.path.basename(path) == 'checkpoints':
    root = path
  if not os.path.isdir(root):
    raise CheckpointError(
        f'{path} is neither a checkpoint (a directory with {PARAMS}/) nor a training workdir '
        '(a directory with checkpoints/<step>/)')
  names = sorted(os.listdir(root), key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
  steps = [os.path.join(root, n) for n in names if n.isdigit()]
  notes = [f'{os.path.join(root, n)}: not checked ('
           + ('moved aside as damaged' if '.corrupt-' in n else 'unfinished write' if
              '.orbax-checkpoint-tmp' in n else 'not a step directory') + ')'
           for n in names if not n.isdigit()]
  if not steps:
    raise CheckpointError(f'no step directories under {root} (expected e.g. {root}/1000)')
  return steps, notes


def main(argv: Sequence[str] | None = None) -> int:
  """`verify DIR`: prints OK or what is wrong for each checkpoint; 1 if any is damaged."""
  parser = argparse.ArgumentParser(prog='python -m avit_jax.checkpoints',
                                   description='Checks avit_jax checkpoints.')
  commands = parser.add_subparsers(dest='command', required=True)
  verify = commands.add_parser(
      'verify', help='read every item of a checkpoint and compare each array with the '
      'checksum recorded when it was saved')
  verify.add_argument('dir', help='a checkpoint (step directory or parameter checkpoint) or a '
                      'training workdir (every step is checked)')
  args = parser.parse_args(argv)
  try:
    directories, notes = _directories_to_check(args.dir)
  except CheckpointError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  damaged = 0
  for directory in directories:
    result = check_step(directory)
    if not result.ok:
      damaged += 1
      print(f'{directory}: DAMAGED\n' + '\n'.join(f'  {p}' for p in result.problems))
    elif result.arrays_verified:
      print(f'{directory}: OK ({result.arrays_verified} arrays match their checksums)')
    else:
      print(f'{directory}: OK but unverified (written before checksums were recorded: every '
            'file reads, the values cannot be checked)')
  for note in notes:
    print(note)
  print(f'{len(directories) - damaged} of {len(directories)} checkpoint(s) intact'
        + (f', {damaged} damaged' if damaged else ''))
  return 1 if damaged else 0


if __name__ == '__main__':
  sys.exit(main())
