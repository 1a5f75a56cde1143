"""Model zoo: `create(model_config, seed)` builds a DeiT / A-ViT from a config.model."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from avit_jax.models.avit import AViT, AViTOutput
from avit_jax.models.vit import VisionTransformer

__all__ = ['AViT', 'AViTOutput', 'VisionTransformer', 'create', 'model_kwargs']

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def model_kwargs(model_config: ml_collections.ConfigDict) -> dict:
  """Constructor arguments of `AViT` from a config.model (validated)."""
  c = model_config
  if c.dtype not in _DTYPES:
    raise ValueError(f'model.dtype must be one of {sorted(_DTYPES)}, got {c.dtype!r}')
  for field in ('image_size', 'patch', 'dim', 'depth', 'heads', 'num_classes', 'in_chans'):
    value = c[field]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'model.{field} must be a positive integer, got {value!r}')
  if c.image_size % c.patch:
    raise ValueError(f'model.patch={c.patch} must divide model.image_size={c.image_size}')
  if c.dim % c.heads:
    raise ValueError(f'model.heads={c.heads} must divide model.dim={c.dim}')
  return dict(
      image_size=c.image_size, patch=c.patch, in_chans=c.in_chans, dim=c.dim, depth=c.depth,
      heads=c.heads, mlp_ratio=c.mlp_ratio, num_classes=c.num_classes, drop_rate=c.drop_rate,
      attn_drop_rate=c.attn_drop_rate, drop_path_rate=c.drop_path_rate,
      halting=c.halting, gate_scale=c.gate_scale, gate_center=c.gate_center, eps=c.eps,
      dtype=_DTYPES[c.dtype])


def create(model_config: ml_collections.ConfigDict, seed: int = 0) -> AViT:
  """Builds the nnx module; parameters from `seed`, dropout stream from `seed` + 1."""
  return AViT(**model_kwargs(model_config), rngs=nnx.Rngs(params=seed, dropout=seed + 1))
