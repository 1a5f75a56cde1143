"""Fine-tuning rules on native parameters: fit a parameter tree to another model config.

Used when parameters are loaded into a model of another class count, image size or set of
special tokens (`config.init_from`, and `avit_jax.convert` after renaming PyTorch weights):
  - a head for another number of classes (or no head at all) is replaced by the model's
    freshly initialised one (truncated normal, std 0.02; zero bias), and so is the
    distillation head head_dist;
  - a distilled DeiT's distillation token (dist_token, head_dist and its position
    embedding, right after the class token's) is dropped for a model without one, and a
    model with one that loads weights without it keeps its freshly initialised token, head
    and position embedding entry;
  - pos_embed over another square patch grid is resampled to the model's grid (bicubic,
    the special tokens' entries kept).
Everything else is left as it is; what still does not fit is the caller's error to report.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from absl import logging

from avit_jax.checkpoints import CheckpointError

HEADS = {'head': ('head.kernel', 'head.bias'), 'head_dist': ('head_dist.kernel', 'head_dist.bias')}
DISTILLATION = ('dist_token', 'head_dist.kernel', 'head_dist.bias')


def resample_pos_embed(pos_embed: np.ndarray, grid: int, prefix: int = 1) -> np.ndarray:
  """float32[1, prefix + g*g, D] -> [1, prefix + grid*grid, D]: bicubic over the patch grid.

  The `prefix` special tokens' entries (class, and distillation) are kept as they are.
  Matches timm's resample_abs_pos_embed (torch bicubic, antialias=True,
  align_corners=False: the same a = -0.5 Keys kernel) up to float32 rounding.
  """
  _, n, d = pos_embed.shape
  old = math.isqrt(n - prefix)
  if old * old != n - prefix:
    raise CheckpointError(f'pos_embed has {n} tokens: expected {prefix} special token(s) '
                          'plus a square grid of patches')
  patches = pos_embed[0, prefix:].reshape(old, old, d)
  resized = jax.image.resize(patches, (grid, grid, d), method='bicubic', antialias=True)
  resized = np.asarray(resized, np.float32).reshape(1, grid * grid, d)
  return np.concatenate([pos_embed[:, :prefix], resized], axis=1)


def adapt_params(params: dict[str, np.ndarray], template: dict[str, np.ndarray],
                 model_config: ml_collections.ConfigDict) -> tuple[dict, dict[str, str]]:
  """Fits flat native parameters {'blocks.0.attn.qkv.kernel': array, ...} to a model.

  template: the model's own flat parameters (its fresh head comes from there). Returns
  (params, changes): a new dict, and what was adapted ({'head_reinitialized': '1000 -> 10',
  'pos_embed_resampled': '14x14 -> 24x24'}) for checkpoint metadata.
  """
  params, changes = dict(params), {}
  for name, (kernel_name, bias_name) in HEADS.items():
    if kernel_name not in template:
      continue
    kernel, want = params.get(kernel_name), template[kernel_name]
    if kernel is None and bias_name not in params:
      changes[f'{name}_reinitialized'] = f'none in checkpoint -> {model_config.num_classes}'
    elif (kernel is not None and np.shape(kernel) != np.shape(want) and np.ndim(kernel) == 2
          and np.shape(kernel)[0] == np.shape(want)[0]):  # same width, other classes
      changes[f'{name}_reinitialized'] = f'{np.shape(kernel)[1]} -> {model_config.num_classes}'
    if f'{name}_reinitialized' in changes:
      logging.warning('Checkpoint %s classes %s (config.model.num_classes): re-initialising '
                      'it (truncated normal, std 0.02; zero bias).', name,
                      changes[f'{name}_reinitialized'])
      params.update({n: template[n] for n in (kernel_name, bias_name)})

  pos = params.get('pos_embed')
  had_distillation = 'dist_token' in params
  wants_distillation = 'dist_token' in template
  if had_distillation and not wants_distillation:
    for name in DISTILLATION:
      params.pop(name, None)
    if pos is not None and np.ndim(pos) == 3:
      pos = np.delete(np.asarray(pos), 1, axis=1)  # the distillation token's entry
    changes['distillation_token'] = 'dropped'
    logging.warning('The checkpoint is a distilled DeiT and config.model.distilled is False: '
                    'dropping its distillation token, head and position embedding entry.')
  elif wants_distillation and not had_distillation:
    params['dist_token'] = template['dist_token']
    if pos is not None and np.ndim(pos) == 3:
      pos = np.concatenate([np.asarray(pos)[:, :1], np.asarray(template['pos_embed'])[:, 1:2],
                            np.asarray(pos)[:, 1:]], axis=1)
    changes['distillation_token'] = 'initialised'
    logging.warning('The checkpoint has no distillation token and config.model.distilled is '
                    'True: initialising the token and its position embedding entry.')
  if pos is not None:
    params['pos_embed'] = pos

  want = template['pos_embed']
  prefix = 2 if wants_distillation else 1
  tokens = np.shape(pos)[1] if pos is not None and np.ndim(pos) == 3 else 0
  old = math.isqrt(tokens - prefix) if tokens > prefix else 0
  # Only a square patch grid of the same width is resampled; anything else is a mismatch.
  if (old and old * old == tokens - prefix and np.shape(pos)[-1] == np.shape(want)[-1]
      and np.shape(pos) != np.shape(want)):
    grid = math.isqrt(np.shape(want)[1] - prefix)
    params['pos_embed'] = resample_pos_embed(np.asarray(pos, np.float32), grid, prefix)
    changes['pos_embed_resampled'] = f'{old}x{old} -> {grid}x{grid}'
    logging.warning('Resampled pos_embed from a %dx%d to a %dx%d patch grid (bicubic, special '
                    'tokens kept) for image_size %d.', old, old, grid, grid,
                    model_config.image_size)
  return params, changes
