"""Multiply-adds per image of DeiT / A-ViT from the tokens active in each layer.

Convention behind DeiT-T's "1.3 GFLOPs" (docs/algorithm.md "FLOPs"): patch embedding, then
per layer qkv, proj, fc1, fc2 for each active token plus attention (QK^T and AV) among the
active tokens, then the head (both heads of a distilled model). LayerNorm, softmax, GELU and additions are not counted. The
`gflops_*` names (also of eval.json's fields) count these multiply-accumulates, the
convention of the published numbers. No timing here.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np

from avit_jax import models


def _geometry(model_config: ml_collections.ConfigDict):
  c = model_config
  tokens = models.num_tokens(c)
  embed = (c.image_size // c.patch) ** 2 * c.patch * c.patch * c.in_chans * c.dim
  heads = models.num_prefix_tokens(c)  # a distilled model has a second head
  return tokens, embed, heads * c.dim * c.num_classes


def block_macs(mlp_rows, attention_rows, attention_pairs,
               model_config: ml_collections.ConfigDict):
  """Multiply-adds of blocks whose MLP branch (fc1, fc2) runs on `mlp_rows` tokens, whose
  attention projections (qkv 3 D^2, proj D^2) run on `attention_rows` and whose attention
  (QK^T and AV) covers `attention_pairs` query-key pairs (the sum of n^2 over the images):
  what a layout that pads rows computes, as well as what the halting needs."""
  c = model_config
  hidden = int(c.dim * c.mlp_ratio)
  return (mlp_rows * 2 * c.dim * hidden + attention_rows * 4 * c.dim * c.dim
          + attention_pairs * 2 * c.dim)


def layer_macs(active_tokens, model_config: ml_collections.ConfigDict):
  """Multiply-adds of one block run on `active_tokens` tokens (array or number)."""
  n = active_tokens
  return block_macs(n, n, n * n, model_config)


def dense_gflops(model_config: ml_collections.ConfigDict) -> float:
  """GMACs of one image through plain DeiT (every token, every layer)."""
  tokens, embed, head = _geometry(model_config)
  layers = model_config.depth * float(layer_macs(tokens, model_config))
  return (embed + layers + head) / 1e9


def embed_head_gflops(model_config: ml_collections.ConfigDict) -> float:
  """GMACs of one image outside the blocks: patch embedding and classifier head."""
  _, embed, head = _geometry(model_config)
  return (embed + head) / 1e9


def active_tokens_per_layer(token_depth, depth: int):
  """token_depth [B, N] (1..L) -> active token count [B, L]: token k runs layer l iff l < n_k."""
  layers = jnp.arange(depth)
  return (jnp.asarray(token_depth)[:, None, :] > layers[None, :, None]).sum(-1)


def gflops_per_image(token_depth, model_config: ml_collections.ConfigDict):
  """GMACs of each image [B] from its token depths [B, N] (A-ViT: only active tokens)."""
  active = active_tokens_per_layer(token_depth, model_config.depth).astype(jnp.float32)
  return embed_head_gflops(model_config) + layer_macs(active, model_config).sum(-1) / 1e9


def gflops_summary(token_depth, model_config: ml_collections.ConfigDict) -> dict:
  """Mean A-ViT GMACs per image, the dense figure, and their ratio (numpy floats)."""
  used = float(np.mean(np.asarray(gflops_per_image(token_depth, model_config))))
  dense = dense_gflops(model_config)
  return {'gflops_per_image': used, 'dense_gflops_per_image': dense,
          'compute_fraction': used / dense}
