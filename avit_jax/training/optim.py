"""DeiT optimizer: AdamW with weight decay masked off biases, norms, pos_embed and cls_token,
lr scaled by global batch / 512, linear warmup from warmup_lr then cosine to min_lr."""

from __future__ import annotations

import jax
import ml_collections
import optax

from avit_jax import config_lib

NO_DECAY_NAMES = ('pos_embed', 'cls_token', 'dist_token')


def check_config(optimizer_config: ml_collections.ConfigDict) -> None:
  """The one check of config.optimizer; raises ValueError naming field, value and fix."""
  if optimizer_config.lr <= 0:
    raise config_lib.invalid('optimizer.lr', optimizer_config.lr, 'expected > 0')
  if not 0.0 <= optimizer_config.ema_decay < 1.0:
    raise config_lib.invalid('optimizer.ema_decay', optimizer_config.ema_decay,
                             'expected a value in [0, 1)')


def scaled_lr(optimizer_config: ml_collections.ConfigDict, batch_size: int) -> float:
  """Peak learning rate: base lr x global batch / 512 (DeiT's linear scaling rule)."""
  return optimizer_config.lr * batch_size / 512.0


def schedule(optimizer_config: ml_collections.ConfigDict, batch_size: int, total_steps: int,
             steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from warmup_lr to the scaled lr, then cosine decay to min_lr at total_steps."""
  warmup = min(int(round(optimizer_config.warmup_epochs * steps_per_epoch)), total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=optimizer_config.warmup_lr, peak_value=scaled_lr(optimizer_config, batch_size),
      warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=optimizer_config.min_lr)


def decay_mask(params):
  """True where weight decay applies: matrices and kernels, not biases, norms or embeddings."""
  def decays(path, leaf):
    names = jax.tree_util.keystr(path, simple=True, separator='.').split('.')
    return leaf.ndim >= 2 and not any(n in names for n in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optimizer_config: ml_collections.ConfigDict,
                   lr_schedule: optax.Schedule) -> optax.GradientTransformation:
  c = optimizer_config
  adamw = optax.adamw(lr_schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                      mask=decay_mask)
  if c.grad_clip_norm and c.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), adamw)
  return adamw
