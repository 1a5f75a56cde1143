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
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from avit_jax import config_lib

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


def latest_step_dir(workdir: str) -> str:
  """The highest-numbered complete step directory WORKDIR/checkpoints/<step>/."""
  root = os.path.join(workdir, 'checkpoints')
  steps = []
  if os.path.isdir(root):
    # Only all-digit names: orbax writes '<step>.orbax-checkpoint-tmp-*' while saving.
    steps = [int(n) for n in os.listdir(root)
             if n.isdigit() and is_checkpoint(os.path.join(root, n))]
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
    """Saves `step` asynchronously, once (a step already saved is left as it is).

    params / ema_params: nnx.State or nested dicts of arrays; opt_state: optax state.
    """
    if step in self.manager.all_steps():
      return
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

  def restore_latest(self, *, abstract_params, abstract_opt_state,
                     abstract_ema=None) -> dict | None:
    """The newest complete step restored onto abstract pytrees (ShapeDtypeStructs carrying
    shardings), or None when there is none yet. The one place a training step is read.

    abstract_params / abstract_ema: pure nested dicts. Returns {'params', 'opt_state',
    'ema_params' (None without EMA), 'train' (JSON: step, epoch, seed, nonfinite_steps)}.
    """
    step = self.manager.latest_step()
    if step is None:
      return None
    items = {PARAMS: ocp.args.StandardRestore(abstract_params),
             'opt_state': ocp.args.StandardRestore(abstract_opt_state),
             'train': ocp.args.JsonRestore()}
    if abstract_ema is not None:
      items['ema_params'] = ocp.args.StandardRestore(abstract_ema)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return {'params': restored[PARAMS], 'opt_state': restored['opt_state'],
            'ema_params': restored['ema_params'] if abstract_ema is not None else None,
            'train': dict(restored['train'])}

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
