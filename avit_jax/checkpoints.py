"""Orbax checkpoints: parameter checkpoints (conversion, init_from, eval) and the trainer's
CheckpointManager with resume. Builds no model.

Layout shared by every writer, so any of them can be read by `load_params`:
  DIR/params/         orbax StandardCheckpointer tree: nested dict of float32 numpy arrays
                      with the model's nnx attribute paths (timm names).
  DIR/metadata/       orbax JSON: {'model': config.model as a dict, 'source': ..., ...}
A trainer step directory WORKDIR/checkpoints/<step>/ has the same two items plus the
optimizer state, so `init_from` and evaluation accept either kind of directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

PARAMS = 'params'
METADATA = 'metadata'


class CheckpointError(ValueError):
  """A checkpoint that is missing, incomplete, or does not fit the model."""


def is_checkpoint(directory: str) -> bool:
  return os.path.isdir(os.path.join(directory, PARAMS))


def save_params(directory: str, params: dict, metadata: dict, *, force: bool = False) -> str:
  """Writes a parameter checkpoint; refuses to overwrite an existing one unless `force`.

  params: nested dict of arrays; metadata: JSON-serialisable dict. Returns the directory.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory):
    if not force:
      raise FileExistsError(f'{directory} exists and is not empty; pass --force to replace it '
                            'or choose another --out directory')
  # Orbax writes into a temporary directory and renames it on success, so a crash
  # mid-write never leaves a half-written checkpoint under `directory`.
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(directory, ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(jax.tree.map(np.asarray, params)),
        METADATA: ocp.args.JsonSave(metadata),
    }), force=force)
  return directory


def load_params(directory: str) -> tuple[dict, dict]:
  """Reads (params, metadata) from a parameter checkpoint or a trainer step directory."""
  directory = os.path.abspath(directory)
  if not is_checkpoint(directory):
    hint = ''
    if os.path.isdir(os.path.join(directory, 'checkpoints')):
      hint = (f' It looks like a training workdir: point at one of its steps, e.g. '
              f'{os.path.join(directory, "checkpoints", "<step>")}.')
    raise CheckpointError(f'{directory} is not an avit_jax checkpoint (expected a '
                          f'{PARAMS}/ subdirectory written by avit_jax.convert or the trainer).'
                          + hint)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    items = {PARAMS: ocp.args.StandardRestore()}
    if os.path.isdir(os.path.join(directory, METADATA)):
      items[METADATA] = ocp.args.JsonRestore()
    restored = checkpointer.restore(directory, ocp.args.Composite(**items))
  metadata = restored[METADATA] if METADATA in items else {}
  return jax.tree.map(np.asarray, restored[PARAMS]), dict(metadata or {})


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """Nested dict -> {'a.b.c': leaf} with '.'-joined keys (list indices as numbers)."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}.{key}' if prefix else str(key)
    if isinstance(value, dict):
      flat.update(flatten(value, name))
    else:
      flat[name] = value
  return flat


def check_compatible(expected: dict, found: dict, what: str) -> None:
  """Raises CheckpointError listing missing, unexpected and mis-shaped parameters."""
  want, have = flatten(expected), flatten(found)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  mismatched = [f'{k}: model {tuple(np.shape(want[k]))} vs checkpoint {tuple(np.shape(have[k]))}'
                for k in sorted(set(want) & set(have))
                if tuple(np.shape(want[k])) != tuple(np.shape(have[k]))]
  if missing or unexpected or mismatched:
    lines = [f'{what} does not fit the model:']
    if mismatched:
      lines.append('  shape mismatches: ' + '; '.join(mismatched))
    if missing:
      lines.append('  missing from the checkpoint: ' + ', '.join(missing))
    if unexpected:
      lines.append('  not in the model: ' + ', '.join(unexpected))
    raise CheckpointError('\n'.join(lines))


def metadata_json(model_config) -> dict:
  """config.model as plain JSON values (tuples -> lists)."""
  return json.loads(model_config.to_json())


def assign_params(model, params: dict, what: str = 'checkpoint') -> None:
  """Copies a nested dict of arrays into the nnx model's parameters after checking names and shapes."""
  state = nnx.state(model, nnx.Param)
  check_compatible(nnx.to_pure_dict(state), params, what)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: np.asarray(a, np.float32), params))
  nnx.update(model, state)
