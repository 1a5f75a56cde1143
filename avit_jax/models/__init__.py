"""Model zoo: `create(model_config, seed)` builds a DeiT / A-ViT from a config.model."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from avit_jax.models.avit import AViT, AViTOutput
from avit_jax.models.vit import VisionTransformer

__all__ = ['AViT', 'AViTOutput', 'VisionTransformer', 'check_config', 'create', 'model_kwargs',
           'num_tokens']

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_POSITIVE_INTS = ('image_size', 'patch', 'dim', 'depth', 'heads', 'num_classes', 'in_chans')


def _invalid(field: str, value, allowed: str) -> ValueError:
  return ValueError(f'config.model.{field}={value!r} is invalid: {allowed}')


def check_config(model_config: ml_collections.ConfigDict) -> None:
  """The one check of config.model (architecture and halting constants); raises ValueError."""
  c = model_config
  if c.dtype not in _DTYPES:
    raise ValueError(f'model.dtype must be one of {sorted(_DTYPES)}, got {c.dtype!r}')
  for field in _POSITIVE_INTS:
    value = c[field]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'model.{field} must be a positive integer, got {value!r}')
  if c.image_size % c.patch:
    raise ValueError(f'model.patch={c.patch} must divide model.image_size={c.image_size}')
  if c.dim % c.heads:
    raise ValueError(f'model.heads={c.heads} must divide model.dim={c.dim}')
  if c.gate_scale <= 0:
    raise _invalid('gate_scale', c.gate_scale, 'expected > 0')
  if not 0.0 < c.eps < 1.0:
    raise _invalid('eps', c.eps, 'expected a value in (0, 1)')
  if not 0.0 <= c.drop_path_rate < 1.0:
    raise _invalid('drop_path_rate', c.drop_path_rate, 'expected a value in [0, 1)')


def num_tokens(model_config: ml_collections.ConfigDict) -> int:
  """N: the class token plus one token per patch, (image_size / patch)^2 + 1."""
  return (model_config.image_size // model_config.patch) ** 2 + 1


def model_kwargs(model_config: ml_collections.ConfigDict) -> dict:
  """Constructor arguments of `AViT` from a config.model (checked by `check_config`)."""
  check_config(model_config)
  c = model_config
  return dict(
      image_size=c.image_size, patch=c.patch, in_chans=c.in_chans, dim=c.dim, depth=c.depth,
      heads=c.heads, mlp_ratio=c.mlp_ratio, num_classes=c.num_classes, drop_rate=c.drop_rate,
      attn_drop_rate=c.attn_drop_rate, drop_path_rate=c.drop_path_rate,
      halting=c.halting, gate_scale=c.gate_scale, gate_center=c.gate_center, eps=c.eps,
      dtype=_DTYPES[c.dtype])


def create(model_config: ml_collections.ConfigDict, seed: int = 0) -> AViT:
  """Builds the nnx module in eval mode (dropout and drop path off: the same images give the
  same outputs); `model.train()` switches them on. Parameters from `seed`, the dropout stream
  from `seed` + 1."""
  model = AViT(**model_kwargs(model_config), rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  model.eval()
  return model
