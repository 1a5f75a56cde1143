"""Array checksums for checkpoints: recorded when a checkpoint is written, compared when it
is read, so a checkpoint whose bytes changed on disk is refused instead of used.

Orbax stores arrays in OCDBT/zarr chunk files without a checksum of their contents: bytes
flipped in a chunk load silently as wrong numbers. Here each array of an item (params,
opt_state, ema_params) gets a record, kept in the checkpoint's JSON `metadata` item under
FIELD; the readers in reading.py compare the arrays they restored with it. Functions return
lists of problems (strings); raising is the caller's business.

Records: a numpy or fully replicated array gets {crc32, dtype, shape}, the crc32 (8 hex
digits) of its C-order bytes. A jax.Array split over devices (mesh.fsdp > 1) gets {dtype,
shape, shards: {index: crc32}}, one crc32 per distinct shard, keyed by the shard's index
into the whole array as 'start:stop' per dimension ('0:32,0:12'; see `shard_key`). So no
process ever needs the whole array: with several processes each checksums the shards it
holds and one gather per save collects them (process 0 alone writes the JSON); on reading,
each process checks the shards it holds, and a whole array read onto one host (the verify
command, `load_params`) is sliced by every recorded index and checked shard by shard.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

FIELD = 'checksums'
ALGORITHM = 'crc32'
SHARDS = 'shards'
# Files orbax writes as JSON inside a step: a truncated or emptied one is damage even where
# the reader at hand would not need it (orbax itself logs and goes on for some of them).
JSON_FILES = ('_CHECKPOINT_METADATA', '_METADATA', '_sharding', 'metadata')
MAX_LISTED = 5  # problems named one by one in a message; the rest are counted

Bounds = tuple[tuple[int, int], ...]  # (start, stop) per dimension


def crc32(value) -> int:
  """crc32 of the C-order bytes of `value` (a numpy array or anything np.asarray takes)."""
  # ascontiguousarray: C order, and at least 1-d so that a view as bytes exists.
  return zlib.crc32(np.ascontiguousarray(value).reshape(-1).view(np.uint8))


def hex32(value: int) -> str:
  return f'{value:08x}'


def is_sharded(x) -> bool:
  """Whether `x` is a jax.Array split over devices: its record has one crc32 per shard."""
  return isinstance(x, jax.Array) and not x.is_fully_replicated


def host_value(x) -> np.ndarray | None:
  """The whole array on this host, or None when it is spread over several processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      return None
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def array_record(value: np.ndarray | None, like=None) -> dict:
  """{crc32 (8 hex digits) of the C-order bytes, dtype, shape}; without crc32 when `value`
  is None (then dtype and shape come from `like`)."""
  if value is None:
    return {'dtype': str(np.dtype(like.dtype)), 'shape': list(like.shape)}
  return {ALGORITHM: hex32(crc32(value)), 'dtype': str(value.dtype),
          'shape': list(value.shape)}


def shard_bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> Bounds:
  """A shard's index (slices into the whole array, as jax gives it) as (start, stop) pairs."""
  return tuple(tuple(s.indices(n)[:2]) for s, n in zip(index, shape))


def shard_key(bounds: Bounds) -> str:
  """A shard's index as recorded: 'start:stop' per dimension joined by ',' ('0:32,0:12'),
  the same on every process whichever device holds the shard."""
  return ','.join(f'{start}:{stop}' for start, stop in bounds)


def key_bounds(key: str, shape: tuple[int, ...]) -> Bounds:
  """The (start, stop) pairs of a recorded shard key; ValueError when it is not a part of an
  array of `shape`."""
  parts = key.split(',') if key else []
  if len(parts) != len(shape):
    raise ValueError(key)
  bounds = []
  for part, n in zip(parts, shape):
    start, stop = (int(v) for v in part.split(':'))
    if not 0 <= start <= stop <= n:
      raise ValueError(key)
    bounds.append((start, stop))
  return tuple(bounds)


def path_name(path) -> str:
  """'blocks/0/attn/qkv/kernel': the same string for a tree as saved and as orbax restores it
  (dict keys, namedtuple fields and sequence indices all become plain names)."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def gather_checksums(local: list[int | None]) -> list[int]:
  """Each slot's crc32 from the process that computed it (None: computed elsewhere).

  Collective with several processes: every process passes the same number of slots, and
  one all-gather serves them all; in one process every slot is local and nothing is sent.
  """
  if jax.process_count() == 1 or not local:
    if any(v is None for v in local):
      raise ValueError('a shard of a single-process array is not addressable')
    return list(local)
  from jax.experimental import multihost_utils

  mine = np.zeros((2, len(local)), np.uint32)  # row 0: crc32, row 1: computed here
  for i, value in enumerate(local):
    if value is not None:
      mine[:, i] = value, 1
  everyone = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 2, slots)
  held = everyone[:, 1].astype(bool)
  if not held.any(axis=0).all():
    raise ValueError('a shard is held by no process (replica 0 of every shard must be '
                     'addressable on some process)')
  return everyone[held.argmax(axis=0), 0, np.arange(len(local))].tolist()


def checksum_field(items: Mapping[str, Any]) -> dict:
  """The value stored under metadata[FIELD]: {'algorithm', 'arrays': {item: {path name:
  record}}}. Items that are None (no EMA) are left out.

  Collective when the arrays span several processes: every process calls it with the same
  trees. Each process checksums the shards it holds (replica 0 of each) and one gather for
  all arrays gives every process the whole field. Leaf by leaf, so the host holds one
  array's (or shard's) copy at a time.
  """
  arrays: dict[str, dict] = {}
  slots, local = [], []  # (item, name, shard key) and this process's crc32 or None
  for item, tree in items.items():
    if tree is None:
      continue
    records = arrays[item] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      name = path_name(path)
      if not is_sharded(leaf):
        records[name] = array_record(host_value(leaf), like=leaf)
        continue
      shape = tuple(leaf.shape)
      records[name] = {'dtype': str(np.dtype(leaf.dtype)), 'shape': list(shape), SHARDS: {}}
      held = {shard_bounds(s.index, shape): s for s in leaf.addressable_shards
              if s.replica_id == 0}
      every = {shard_bounds(i, shape) for i in leaf.sharding.devices_indices_map(shape).values()}
      for bounds in sorted(every):
        slots.append((item, name, shard_key(bounds)))
        local.append(crc32(np.asarray(held[bounds].data)) if bounds in held else None)
  for (item, name, key), value in zip(slots, gather_checksums(local)):
    arrays[item][name][SHARDS][key] = hex32(value)
  return {'algorithm': ALGORITHM, 'arrays': arrays}


def tree_checksums(tree) -> dict[str, dict]:
  """{path name: record} for every array leaf of `tree` (collective, as checksum_field)."""
  return checksum_field({'tree': tree})['arrays']['tree']


def compare(item: str, tree, recorded: Mapping[str, dict]) -> list[str]:
  """What differs between the arrays of `tree` (as restored) and their records."""
  found = {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  problems = [f'{item}/{name}: recorded at save time, missing on disk'
              for name in sorted(set(recorded) - set(found))]
  problems += [f'{item}/{name}: on disk but no checksum was recorded for it'
               for name in sorted(set(found) - set(recorded))]
  for name in sorted(set(found) & set(recorded)):
    problems += leaf_problems(f'{item}/{name}', found[name], recorded[name])
  return problems


def leaf_problems(label: str, leaf, want: Any) -> list[str]:
  """What differs between one restored array and its record (either format)."""
  if not isinstance(leaf, jax.Array):
    leaf = np.asarray(leaf)
  dtype, shape = str(np.dtype(leaf.dtype)), tuple(leaf.shape)
  if not isinstance(want, dict) or not isinstance(want.get('shape'), list):
    return [f'{label}: the recorded checksum {want!r:.80} is not a record of this format']
  if (want.get('dtype'), tuple(want['shape'])) != (dtype, shape):
    return [f'{label}: {dtype}{shape} on disk, {want.get("dtype")}{tuple(want["shape"])} '
            'when saved']
  if SHARDS in want:
    return shard_problems(label, leaf, want[SHARDS])
  if ALGORITHM in want:
    value = host_value(leaf)  # None: a whole-array record, the array now over processes
    if value is not None and hex32(crc32(value)) != want[ALGORITHM]:
      return [f'{label}: {ALGORITHM} {hex32(crc32(value))} of the data read, '
              f'{want[ALGORITHM]} when saved (the bytes changed on disk)']
  return []


def contains(outer: Bounds, inner: Bounds) -> bool:
  """Whether the box `inner` lies within the box `outer`."""
  return all(a <= c and d <= b for (a, b), (c, d) in zip(outer, inner))


def shard_problems(label: str, leaf, shards: Any) -> list[str]:
  """Checks each recorded shard of one array: where this process holds it (a sharded
  jax.Array: the addressable shard containing it), or sliced out of the whole array (numpy,
  replicated). A recorded shard that another process holds is that process's to check."""
  shape = tuple(leaf.shape)
  if not isinstance(shards, dict):
    return [f'{label}: the recorded shard checksums are not a mapping']
  problems, boxes = [], {}
  for key in shards:
    try:
      boxes[key_bounds(key, shape)] = key
    except ValueError:
      problems.append(f'{label}: recorded shard index {key!r} is not a part of an array of '
                      f'shape {shape}')
  held, everywhere, whole = {}, set(), None
  if is_sharded(leaf):
    for s in sorted(leaf.addressable_shards, key=lambda s: s.replica_id):
      held.setdefault(shard_bounds(s.index, shape), s)
    everywhere = {shard_bounds(i, shape)
                  for i in leaf.sharding.devices_indices_map(shape).values()}
  else:
    whole = host_value(leaf)
  unchecked, copies = 0, {}  # copies: host copies of the shards held here, as needed
  for bounds in sorted(boxes):
    key = boxes[bounds]
    holder = next((b for b in held if contains(b, bounds)), None)
    if holder is not None:  # this process holds it: slice it out of the shard
      if holder not in copies:
        copies[holder] = np.asarray(held[holder].data)
      data = copies[holder][tuple(slice(start - outer, stop - outer) for (start, stop), (outer, _)
                                  in zip(bounds, holder))]
    elif any(contains(b, bounds) for b in everywhere):
      continue  # held whole by another process, which checks it
    elif whole is not None or (is_sharded(leaf) and leaf.is_fully_addressable):
      # Saved on another layout (its shard spans shards here): from the whole array.
      whole = np.asarray(leaf) if whole is None else whole
      data = whole[tuple(slice(start, stop) for start, stop in bounds)]
    else:
      unchecked += 1
      continue
    got = hex32(crc32(data))
    if got != shards[key]:
      problems.append(f'{label}[{key}]: {ALGORITHM} {got} of the data read, {shards[key]} '
                      'when saved (the bytes changed on disk)')
  if unchecked:
    logging.warning('%s: %d saved shard(s) span several processes in the sharding it was '
                    'restored with; their checksums are not verified', label, unchecked)
  return problems


def json_problems(directory: str, items: tuple[str, ...] | None = None) -> list[str]:
  """JSON files of a step directory that do not parse (truncated, emptied, overwritten):
  the top-level _CHECKPOINT_METADATA and, in each item subdirectory (all, or `items`),
  _METADATA, _sharding, metadata and array_metadatas/*."""
  root = epath.Path(directory)
  names = ['_CHECKPOINT_METADATA']
  for item in sorted(p.name for p in root.iterdir()) if items is None else items:
    if not (root / item).is_dir():
      continue
    names += [f'{item}/{name}' for name in JSON_FILES[1:]]
    array_dir = root / item / 'array_metadatas'
    if array_dir.is_dir():
      names += [f'{item}/array_metadatas/{n}' for n in sorted(p.name for p in array_dir.iterdir())]
  problems = []
  for name in names:
    try:
      data = (root / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
      continue  # a missing file is the reader's to report (orbax needs some, not all)
    try:
      json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
      what = 'is empty' if not data else f'is not valid JSON ({len(data)} bytes; {e})'
      problems.append(f'{name} {what}')
  return problems


def summary(problems: list[str]) -> str:
  """The first MAX_LISTED problems joined with '; ', and how many more there are."""
  text = '; '.join(problems[:MAX_LISTED])
  if len(problems) > MAX_LISTED:
    text += f'; and {len(problems) - MAX_LISTED} more'
  return text
