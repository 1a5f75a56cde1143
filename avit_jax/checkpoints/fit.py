"""Parameters against a model: what does not fit (names, shapes, the architecture they
imply) as one error message, and copying parameters that fit into an nnx model."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from avit_jax import config_lib
from avit_jax.checkpoints.layout import CheckpointError


def misfit_message(header: str, expected: Mapping[str, Any], found: Mapping[str, Any], *,
                   label: Callable[[str], str] = str,
                   unknown_names: Sequence[str] = (),
                   original: Mapping[str, Any] | None = None) -> str | None:
  """What makes parameters not fit a model, as an error message; None when they fit.

  expected / found: flat {name: array (or anything with a shape)}, in whatever naming the
  message should use. Lists mis-shaped, missing and unexpected names with their shapes
  (`label` may add where a name came from; `unknown_names` are source names that map to
  nothing), and a hint when the architecture read off the names differs (off `original`,
  the arrays as the file has them, when fine-tuning rules changed `found`).
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
    lines.append('  shape mismatches: ' + _first('; ', mismatched))
  if missing:
    lines.append('  missing from the checkpoint: ' + _first(', ', [
        f'{k} {shape(expected[k])}' for k in missing]))
  if unexpected or unknown_names:
    lines.append('  not in the model: ' + _first(', ', [
        f'{label(k)} {shape(found[k])}' for k in unexpected] + sorted(unknown_names)))
  hint = _geometry_hint(_geometry(expected), _geometry(found if original is None else original))
  if hint:
    lines.append(hint)
  return '\n'.join(lines)


MAX_LISTED = 5  # names listed one by one per kind of misfit; the rest are counted


def _first(separator: str, items: Sequence[str]) -> str:
  text = separator.join(items[:MAX_LISTED])
  return text + (f'{separator}and {len(items) - MAX_LISTED} more' if len(items) > MAX_LISTED
                 else '')


def _geometry(flat: Mapping[str, Any]) -> dict[str, int]:
  """Architecture read off parameter names and shapes, in native (Flax) or timm / torch
  layout: depth, width (dim), patch, image_size, num_classes and mlp_ratio, which together
  fix every parameter's shape; a long list of mismatches comes down to a few of these."""
  shape = lambda k: tuple(int(n) for n in np.shape(flat[k]))
  geometry = {}
  blocks = {int(k.split('.')[1]) for k in flat if re.match(r'blocks\.\d+\.', k)}
  if blocks:
    geometry['depth'] = max(blocks) + 1
  if 'cls_token' in flat:
    geometry['dim'] = shape('cls_token')[-1]
  if 'patch_embed.proj.kernel' in flat:  # [p, p, in, dim]
    geometry['patch'] = shape('patch_embed.proj.kernel')[0]
  elif 'patch_embed.proj.weight' in flat:  # [dim, in, p, p]
    geometry['patch'] = shape('patch_embed.proj.weight')[-1]
  if 'pos_embed' in flat and 'patch' in geometry:
    grid = int(round((shape('pos_embed')[-2] - 1) ** 0.5))
    geometry['image_size'] = grid * geometry['patch']
  if 'head.kernel' in flat:  # [dim, classes]
    geometry['num_classes'] = shape('head.kernel')[-1]
  elif 'head.weight' in flat:  # [classes, dim]
    geometry['num_classes'] = shape('head.weight')[0]
  # The MLP's width where every block agrees on it (one odd block is a misfit of its own).
  hidden = {shape(k)[-1] if k.endswith('kernel') else shape(k)[0] for k in flat
            if re.fullmatch(r'blocks\.\d+\.mlp\.fc1\.(kernel|weight)', k)}
  if len(hidden) == 1 and geometry.get('dim'):
    geometry['mlp_ratio'] = hidden.pop() / geometry['dim']
  return geometry


def _geometry_hint(model: dict[str, int], found: dict[str, int]) -> str | None:
  """'hint: the checkpoint has depth 3 and width 192; ... --config.model.depth=3 ...' when
  the geometries differ: depth and width always (they name the variant), the others that
  differ. Together they give every shape the checkpoint has; the heads are not in the
  weights, so a new width names DeiT's (width / 64)."""
  differ = [k for k in model if found.get(k) not in (None, model[k])]
  if not differ:
    return None
  named = [k for k in ('depth', 'dim') if k in found] + [
      k for k in ('patch', 'image_size', 'num_classes', 'mlp_ratio') if k in differ]
  value = lambda k: f'{found[k]:g}' if isinstance(found[k], float) else str(found[k])
  parts = [f'{"width" if k == "dim" else k} {value(k)}' for k in named]
  text = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
  flags = [f'--config.model.{k}={value(k)}' for k in named]
  if 'dim' in differ and found['dim'] % 64 == 0:
    flags.append(f'--config.model.heads={found["dim"] // 64}')
  return (f'  hint: the checkpoint has {text}; choose the matching config or override, e.g. '
          + ' '.join(flags))


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
