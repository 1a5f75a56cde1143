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
    want_geometry, have_geometry = _geometry(want), _geometry(have)
    differ = [k for k in want_geometry if have_geometry.get(k) not in (None, want_geometry[k])]
    if differ:
      lines.append('  hint: the checkpoint has ' + ', '.join(
          f'{k} {have_geometry[k]}' for k in differ) + ' but the model has ' + ', '.join(
              f'{k} {want_geometry[k]}' for k in differ) + '; choose the matching config or '
          'override, e.g. ' + ' '.join(f'--config.model.{k}={have_geometry[k]}' for k in differ))
    raise CheckpointError('\n'.join(lines))


def _geometry(flat: dict) -> dict:
  """Architecture read off parameter shapes (flat timm-style names): depth, dim, patch,
  num_classes; a long list of shape mismatches usually comes down to one of these."""
  geometry = {}
  blocks = {int(k.split('.')[1]) for k in flat if k.startswith('blocks.')}
  if blocks:
    geometry['depth'] = max(blocks) + 1
  if 'cls_token' in flat:
    geometry['dim'] = int(np.shape(flat['cls_token'])[-1])
  if 'patch_embed.proj.kernel' in flat:
    geometry['patch'] = int(np.shape(flat['patch_embed.proj.kernel'])[0])
  if 'head.kernel' in flat:
    geometry['num_classes'] = int(np.shape(flat['head.kernel'])[-1])
  return geometry


def metadata_json(model_config) -> dict:
  """config.model as plain JSON values (tuples -> lists)."""
  return json.loads(model_config.to_json())


def assign_params(model, params: dict, what: str = 'checkpoint') -> None:
  """Copies a nested dict of arrays into the nnx model's parameters after checking names and shapes."""
  state = nnx.state(model, nnx.Param)
  check_compatible(nnx.to_pure_dict(state), params, what)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: np.asarray(a, np.float32), params))
  nnx.update(model, state)


class TrainCheckpoints:
  """The trainer's orbax CheckpointManager under WORKDIR/checkpoints.

  Each step directory holds `params` and `metadata` (so `load_params` reads it), plus
  `opt_state`, `ema_params` and `train` (JSON: step, epoch, data position, seed). Keeps the
  last `keep` steps and the best by eval top-1; saves asynchronously.
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
    """params / ema_params: nnx.State or nested dicts of arrays; opt_state: optax state."""
    to_pure = lambda s: nnx.to_pure_dict(s) if isinstance(s, nnx.State) else s
    items = {
        PARAMS: ocp.args.StandardSave(to_pure(params)),
        METADATA: ocp.args.JsonSave(metadata),
        'opt_state': ocp.args.StandardSave(opt_state),
        'train': ocp.args.JsonSave(train),
    }
    if ema_params is not None:
      items['ema_params'] = ocp.args.StandardSave(to_pure(ema_params))
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, *, abstract_params, abstract_opt_state, abstract_ema=None):
    """Restores onto abstract pytrees (ShapeDtypeStructs carrying shardings).

    abstract_params: pure nested dict. Returns (params dict, opt_state, ema dict or None, train).
    """
    items = {PARAMS: ocp.args.StandardRestore(abstract_params),
             'opt_state': ocp.args.StandardRestore(abstract_opt_state),
             'train': ocp.args.JsonRestore()}
    if abstract_ema is not None:
      items['ema_params'] = ocp.args.StandardRestore(abstract_ema)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return (restored[PARAMS], restored['opt_state'],
            restored['ema_params'] if abstract_ema is not None else None, restored['train'])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
