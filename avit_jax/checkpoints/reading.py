"""Verified reads of one checkpoint directory: each item through orbax with its failures
turned into DamagedCheckpointError naming the file, and the restored arrays compared with the
checksums recorded at save time (integrity.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from avit_jax.checkpoints import integrity
from avit_jax.checkpoints.layout import (ARRAY_ITEMS, JSON_ITEMS, METADATA, PARAMS,
                                         DamagedCheckpointError, absolute, is_checkpoint)


def host_sharding() -> jax.sharding.Sharding:
  """Where a checkpoint saved on another device layout is restored: one host (CPU) device.
  Without it orbax refuses a checkpoint written on, e.g., 8 devices in a 1-device process."""
  try:
    device = jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    device = jax.local_devices()[0]
  return jax.sharding.SingleDeviceSharding(device)


def whole_on_host(directory: str, name: str) -> ocp.args.StandardRestore:
  """Restore arguments that put every array of item `name` whole on this process's host
  device, however it was sharded when saved: with several processes, orbax would otherwise
  restore a checkpoint written over all of them onto all of them again."""
  try:
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / name).tree
  except Exception as e:  # orbax and TensorStore raise many types: all mean unreadable
    raise DamagedCheckpointError(directory, [f'{name}/ cannot be read ({reason(e)})']) from e
  device = host_sharding()
  return ocp.args.StandardRestore(jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved))


def reason(error: BaseException) -> str:
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


def silence_abandoned_reads() -> None:
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


def restore_item(directory: str, restore: Callable[[ocp.args.Composite], Any], name: str,
                  args) -> Any:
  """One item of a step through `restore` (a Checkpointer's or `local_reader`'s); any
  failure to read it becomes a DamagedCheckpointError naming the item."""
  if not (epath.Path(directory) / name).is_dir():
    raise DamagedCheckpointError(directory, [f'{name}/ is missing'])
  try:
    return restore(ocp.args.Composite(**{name: args}))[name]
  except Exception as e:  # orbax, TensorStore and json raise many types: all mean unreadable
    silence_abandoned_reads()
    raise DamagedCheckpointError(directory, [f'{name}/ cannot be read ({reason(e)})']) from e


def listed_items(directory: str) -> set[str]:
  """The items the step's _CHECKPOINT_METADATA says it holds (empty when unreadable)."""
  try:
    text = (epath.Path(directory) / '_CHECKPOINT_METADATA').read_text()
    return set(json.loads(text).get('item_handlers') or ())
  except (OSError, ValueError, AttributeError):
    return set()


def read_metadata(directory: str, restore) -> dict:
  """The metadata item; {} for a checkpoint written without one (a parameter checkpoint
  written by other orbax code)."""
  if not (epath.Path(directory) / METADATA).is_dir():
    if METADATA in listed_items(directory):
      raise DamagedCheckpointError(directory, [f'{METADATA}/ is missing (the checkpoint '
                                               'lists it in _CHECKPOINT_METADATA)'])
    return {}
  metadata = restore_item(directory, restore, METADATA, ocp.args.JsonRestore())
  if not isinstance(metadata, dict):
    raise DamagedCheckpointError(directory, [f'{METADATA}/metadata holds '
                                             f'{type(metadata).__name__}, not a JSON object'])
  return dict(metadata)


def verify_checksums(directory: str, metadata: dict, trees: Mapping[str, Any], *, warn: bool = True,
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
  compares every array with its checksum; never raises for a damaged checkpoint.

  Reads on this process alone (no collective); with several processes, an array restored
  over all of them has each process check the shards it holds, so the verdict is this
  process's (TrainCheckpoints.last_good_step agrees on it)."""
  directory = absolute(directory)
  if not is_checkpoint(directory):
    return StepCheck(directory, [f'{PARAMS}/ is missing: not a complete checkpoint'], 0)
  present = {n for n in ARRAY_ITEMS + JSON_ITEMS if (epath.Path(directory) / n).is_dir()}
  items = sorted(present | (listed_items(directory) & set(ARRAY_ITEMS + JSON_ITEMS)))
  try:
    problems = integrity.json_problems(directory, tuple(items))
    if problems:
      raise DamagedCheckpointError(directory, problems)
    with local_reader(directory) as restore:
      metadata = read_metadata(directory, restore)
      trees = {n: jax.tree.map(on_host, restore_item(
          directory, restore, n, ocp.args.StandardRestore(fallback_sharding=host_sharding())))
               for n in ARRAY_ITEMS if n in items}
      if 'train' in items:
        check_train(directory, restore_item(directory, restore, 'train',
                                              ocp.args.JsonRestore()))
    return StepCheck(directory, [], verify_checksums(directory, metadata, trees, warn=False,
                                            complete=True))
  except DamagedCheckpointError as e:
    return StepCheck(directory, e.problems, 0)


def on_host(x):
  """A numpy copy of `x`, unless it is an array spread over several processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x
  return np.asarray(x)


@contextlib.contextmanager
def local_reader(directory: str) -> Iterator[Callable[[ocp.args.Composite], Any]]:
  """A restore function for one checkpoint directory that reads on this process alone.

  Orbax's Checkpointer waits at a barrier after each read; a process whose read fails skips
  it and leaves the others waiting there. Readers through this one finish (intact or
  damaged) on every process, and the processes then agree on the verdict themselves."""
  handler = ocp.CompositeCheckpointHandler()
  try:
    yield lambda args: handler.restore(epath.Path(directory), args=args)
  finally:
    handler.close()


def check_train(directory: str, train: Any) -> dict:
  """The trainer's JSON item: a dict whose step is the directory's."""
  name = epath.Path(directory).name
  if not isinstance(train, dict) or (name.isdigit() and train.get('step') != int(name)):
    raise DamagedCheckpointError(directory, [
        f'train/metadata holds {train!r:.80}, expected {{"step": {name}, ...}}'])
  return dict(train)
