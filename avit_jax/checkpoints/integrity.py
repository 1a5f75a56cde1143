"""Array checksums for checkpoints: recorded when a checkpoint is written, compared when it
is read, so a checkpoint whose bytes changed on disk is refused instead of used.

Orbax stores arrays in OCDBT/zarr chunk files without a checksum of their contents: bytes
flipped in a chunk load silently as wrong numbers. Here each array of an item (params,
opt_state, ema_params) gets {crc32, dtype, shape} of the host copy's bytes, kept in the
checkpoint's JSON `metadata` item under FIELD; the readers in reading.py compare the
arrays they restored with it. Functions return lists of problems (strings); raising is the
caller's business.

Multi-host: a checksum needs the whole array on one process. A leaf sharded over several
processes (fsdp across hosts) gets dtype and shape but no crc32, and is checked for those
only; on a single process (every run of this repository so far) every array is checksummed.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

FIELD = 'checksums'
ALGORITHM = 'crc32'
# Files orbax writes as JSON inside a step: a truncated or emptied one is damage even where
# the reader at hand would not need it (orbax itself logs and goes on for some of them).
JSON_FILES = ('_CHECKPOINT_METADATA', '_METADATA', '_sharding', 'metadata')
MAX_LISTED = 5  # problems named one by one in a message; the rest are counted


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
  # ascontiguousarray: C order, and at least 1-d so that a view as bytes exists.
  data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
  return {ALGORITHM: f'{zlib.crc32(data):08x}', 'dtype': str(value.dtype),
          'shape': list(value.shape)}


def path_name(path) -> str:
  """'blocks/0/attn/qkv/kernel': the same string for a tree as saved and as orbax restores it
  (dict keys, namedtuple fields and sequence indices all become plain names)."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def tree_checksums(tree) -> dict[str, dict]:
  """{path name: array_record} for every array leaf of `tree`. Leaf by leaf, so the host
  holds one array's copy at a time."""
  records = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    records[path_name(path)] = array_record(host_value(leaf), like=leaf)
  return records


def checksum_field(items: Mapping[str, Any]) -> dict:
  """The value stored under metadata[FIELD]: {'algorithm', 'arrays': {item: tree_checksums}}.
  Items that are None (no EMA) are left out."""
  return {'algorithm': ALGORITHM,
          'arrays': {name: tree_checksums(tree) for name, tree in items.items()
                     if tree is not None}}


def compare(item: str, tree, recorded: Mapping[str, dict]) -> list[str]:
  """What differs between the arrays of `tree` (as restored) and their records."""
  found = tree_checksums(tree)
  problems = [f'{item}/{name}: recorded at save time, missing on disk'
              for name in sorted(set(recorded) - set(found))]
  problems += [f'{item}/{name}: on disk but no checksum was recorded for it'
               for name in sorted(set(found) - set(recorded))]
  for name in sorted(set(found) & set(recorded)):
    want, got = recorded[name], found[name]
    if (want['dtype'], want['shape']) != (got['dtype'], got['shape']):
      problems.append(f'{item}/{name}: {got["dtype"]}{tuple(got["shape"])} on disk, '
                      f'{want["dtype"]}{tuple(want["shape"])} when saved')
    elif ALGORITHM in want and ALGORITHM in got and want[ALGORITHM] != got[ALGORITHM]:
      problems.append(f'{item}/{name}: {ALGORITHM} {got[ALGORITHM]} of the data read, '
                      f'{want[ALGORITHM]} when saved (the bytes changed on disk)')
  return problems


def json_problems(directory: str, items: tuple[str, ...] | None = None) -> list[str]:
  """JSON files of a step directory that do not parse (truncated, emptied, overwritten):
  the top-level _CHECKPOINT_METADATA and, in each item subdirectory (all, or `items`),
  _METADATA, _sharding, metadata and array_metadatas/*."""
  paths = [os.path.join(directory, '_CHECKPOINT_METADATA')]
  for item in sorted(os.listdir(directory)) if items is None else items:
    item_dir = os.path.join(directory, item)
    if not os.path.isdir(item_dir):
      continue
    paths += [os.path.join(item_dir, name) for name in JSON_FILES[1:]]
    array_dir = os.path.join(item_dir, 'array_metadatas')
    if os.path.isdir(array_dir):
      paths += [os.path.join(array_dir, n) for n in sorted(os.listdir(array_dir))]
  problems = []
  for path in paths:
    if not os.path.isfile(path):
      continue  # a missing file is the reader's to report (orbax needs some, not all)
    try:
      with open(path, 'rb') as f:
        json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
      size = os.path.getsize(path)
      what = 'is empty' if size == 0 else f'is not valid JSON ({size} bytes; {e})'
      problems.append(f'{os.path.relpath(path, directory)} {what}')
  return problems


def summary(problems: list[str]) -> str:
  """The first MAX_LISTED problems joined with '; ', and how many more there are."""
  text = '; '.join(problems[:MAX_LISTED])
  if len(problems) > MAX_LISTED:
    text += f'; and {len(problems) - MAX_LISTED} more'
  return text
