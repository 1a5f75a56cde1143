"""Fine-tuning rules on native parameters: fit a parameter tree to another model config.

Used when parameters are loaded into a model of another class count or image size
(`config.init_from`, and `avit_jax.convert` after renaming PyTorch weights):
  - a head for another number of classes (or no head at all) is replaced by the model's
    freshly initialised one (truncated normal, std 0.02; zero bias);
  - pos_embed over another square patch grid is resampled to the model's grid (bicubic,
    the class token's entry kept).
Everything else is left as it is; what still does not fit is the caller's error to report.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from absl import logging

from avit_jax.checkpoints import CheckpointError

HEAD = ('head.kernel', 'head.bias')


def resample_pos_embed(pos_embed: np.ndarray, grid: int) -> np.ndarray:
  """float32[1, 1 + g*g, D] -> [1, 1 + grid*grid, D]: bicubic over the patch grid.

  The class token's entry is kept as is. Matches timm's resample_abs_pos_embed (torch
  bicubic, antialias=True, align_corners=False: the same a = -0.5 Keys kernel) up to
  float32 rounding.
  """
  _, n, d = pos_embed.shape
  old = math.isqrt(n - 1)
  if old * old != n - 1:
    raise CheckpointError(f'pos_embed has {n} tokens: expected 1 class token plus a square '
                       'grid of patches')
  patches = pos_embed[0, 1:].reshape(old, old, d)
  resized = jax.image.resize(patches, (grid, grid, d), method='bicubic', antialias=True)
  resized = np.asarray(resized, np.float32).reshape(1, grid * grid, d)
  return np.concatenate([pos_embed[:, :1], resized], axis=1)


def adapt_params(params: dict[str, np.ndarray], template: dict[str, np.ndarray],
                 model_config: ml_collections.ConfigDict) -> tuple[dict, dict[str, str]]:
  """Fits flat native parameters {'blocks.0.attn.qkv.kernel': array, ...} to a model.

  template: the model's own flat parameters (its fresh head comes from there). Returns
  (params, changes): a new dict, and what was adapted ({'head_reinitialized': '1000 -> 10',
  'pos_embed_resampled': '14x14 -> 24x24'}) for checkpoint metadata.
  """
  params, changes = dict(params), {}
  kernel, want = params.get('head.kernel'), template['head.kernel']
  if kernel is None and 'head.bias' not in params:
    changes['head_reinitialized'] = f'none in checkpoint -> {model_config.num_classes}'
  elif (kernel is not None and np.shape(kernel) != np.shape(want) and np.ndim(kernel) == 2
        and np.shape(kernel)[0] == np.shape(want)[0]):  # same width, other classes
    changes['head_reinitialized'] = f'{np.shape(kernel)[1]} -> {model_config.num_classes}'
  if 'head_reinitialized' in changes:
    logging.warning('Checkpoint head classes %s (config.model.num_classes): re-initialising '
                    'the head (truncated normal, std 0.02; zero bias).',
                    changes['head_reinitialized'])
    params.update({name: template[name] for name in HEAD})

  pos, want = params.get('pos_embed'), template['pos_embed']
  tokens = np.shape(pos)[1] if pos is not None and np.ndim(pos) == 3 else 0
  old = math.isqrt(tokens - 1) if tokens else 0
  # Only a square patch grid of the same width is resampled; anything else is a mismatch.
  if (old and old * old == tokens - 1 and np.shape(pos)[-1] == np.shape(want)[-1]
      and np.shape(pos) != np.shape(want)):
    grid = math.isqrt(np.shape(want)[1] - 1)
    params['pos_embed'] = resample_pos_embed(np.asarray(pos, np.float32), grid)
    changes['pos_embed_resampled'] = f'{old}x{old} -> {grid}x{grid}'
    logging.warning('Resampled pos_embed from a %dx%d to a %dx%d patch grid (bicubic, class '
                    'token kept) for image_size %d.', old, old, grid, grid,
                    model_config.image_size)
  return params, changes
