"""Model zoo: `create(model_config, seed)` builds a DeiT / A-ViT from a config.model, and
`load(checkpoint)` builds one holding a checkpoint's parameters."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from avit_jax import checkpoints, config_lib
from avit_jax.models.avit import AViT, AViTOutput
from avit_jax.models.vit import VisionTransformer

__all__ = ['AViT', 'AViTOutput', 'VisionTransformer', 'check_config', 'create', 'from_params', 'load',
           'model_kwargs', 'num_prefix_tokens', 'num_tokens']

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_POSITIVE_INTS = ('image_size', 'patch', 'dim', 'depth', 'heads', 'num_classes', 'in_chans')


def check_config(model_config: ml_collections.ConfigDict) -> None:
  """The one check of config.model (architecture and halting constants); raises
  config_lib.ConfigError."""
  c = model_config
  invalid = lambda field, allowed: config_lib.invalid(f'model.{field}', c[field], allowed)
  if c.dtype not in _DTYPES:
    raise invalid('dtype', f'expected one of {sorted(_DTYPES)}')
  for field in _POSITIVE_INTS:
    if not isinstance(c[field], int) or c[field] <= 0:
      raise invalid(field, 'expected a positive integer')
  if c.image_size % c.patch:
    raise invalid('patch', f'it must divide model.image_size={c.image_size}')
  if c.dim % c.heads:
    raise invalid('heads', f'it must divide model.dim={c.dim}')
  if c.gate_scale <= 0:
    raise invalid('gate_scale', 'expected > 0')
  if not 0.0 < c.eps < 1.0:
    raise invalid('eps', 'expected a value in (0, 1)')
  if not 0.0 <= c.drop_path_rate < 1.0:
    raise invalid('drop_path_rate', 'expected a value in [0, 1)')


def num_prefix_tokens(model_config: ml_collections.ConfigDict) -> int:
  """The tokens before the patches: the class token, and the distillation token of a
  distilled model."""
  return 2 if model_config.get('distilled', False) else 1


def num_tokens(model_config: ml_collections.ConfigDict) -> int:
  """N: the special tokens plus one token per patch, (image_size / patch)^2 + 1 (+ 1 when
  distilled)."""
  return (model_config.image_size // model_config.patch) ** 2 + num_prefix_tokens(model_config)


def model_kwargs(model_config: ml_collections.ConfigDict) -> dict:
  """Constructor arguments of `AViT` from a config.model (checked by `check_config`)."""
  check_config(model_config)
  c = model_config
  return dict(
      image_size=c.image_size, patch=c.patch, in_chans=c.in_chans, dim=c.dim, depth=c.depth,
      heads=c.heads, mlp_ratio=c.mlp_ratio, num_classes=c.num_classes,
      distilled=c.get('distilled', False), drop_rate=c.drop_rate,
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


def from_params(model_config: ml_collections.ConfigDict, params, *, what: str,
                seed: int = 0) -> AViT:
  """A model of `model_config` (eval mode) holding `params`, a nested dict of arrays as
  nnx.to_pure_dict gives it; what does not fit is refused with one CheckpointError naming
  `what`, the arrays and the config fields that would fit."""
  model = create(model_config, seed=seed)
  checkpoints.assign_params(model, params, what=what)
  return model


def load(checkpoint: str, model_config: ml_collections.ConfigDict | None = None, *,
         seed: int = 0) -> tuple[AViT, dict]:
  """(model, metadata) from a checkpoint directory or a training workdir (its newest step).

  model: in eval mode, holding the checkpoint's verified parameters; its architecture and
  halting constants are `model_config` when given (e.g. a config with another gate centre),
  else those the checkpoint recorded. metadata: the checkpoint's metadata dict ('model', and
  'data' with the normalisation mean / std, 'loss', 'source' where the writer recorded them).
  """
  step_dir = checkpoints.resolve_checkpoint(checkpoint)
  params, metadata = checkpoints.load_params(step_dir)
  if model_config is None:
    if 'model' not in metadata:
      raise checkpoints.CheckpointError(
          f'{step_dir} records no model config; pass the config it was trained with')
    model_config = ml_collections.ConfigDict(metadata['model'])
  return from_params(model_config, params, what=f'checkpoint {step_dir}', seed=seed), metadata
