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
