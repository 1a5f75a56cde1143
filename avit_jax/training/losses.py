"""A-ViT training losses (docs/algorithm.md, "Losses") and DeiT's distillation loss. Pure
functions of arrays and floats, and the checks of the config fields they read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.scipy.stats import norm

from avit_jax import config_lib


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """int [B] -> float32 [B, C]: 1 - smoothing + smoothing / C on the label, smoothing / C
  elsewhere (the targets mixup / cutmix then mix)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of -sum(targets * log_softmax(logits)); logits, targets [B, C]."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def distillation_loss(dist_logits: jax.Array, teacher_logits: jax.Array, kind: str,
                      tau: float) -> jax.Array:
  """DeiT's loss of the distillation head against a teacher; logits [B, C].

  'hard': cross-entropy with the teacher's argmax as the label. 'soft': KL(teacher || head)
  of the distributions at temperature tau, times tau^2, summed and divided by B * C as DeiT
  does. The teacher's logits get no gradient.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  dist_logits = dist_logits.astype(jnp.float32)
  if kind == 'hard':
    return optax.softmax_cross_entropy_with_integer_labels(
        dist_logits, jnp.argmax(teacher_logits, axis=-1)).mean()
  log_p = jax.nn.log_softmax(teacher_logits / tau, axis=-1)
  log_q = jax.nn.log_softmax(dist_logits / tau, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q)) * tau * tau / dist_logits.size


def check_distill_config(distill_config) -> None:
  """The checks of config.distill's numbers (validation.check_teacher opens the teacher)."""
  d = distill_config
  if d.kind not in config_lib.DISTILL_KINDS:
    raise config_lib.invalid('distill.kind', d.kind, f'expected one of {config_lib.DISTILL_KINDS}')
  if not 0.0 <= d.alpha <= 1.0:
    raise config_lib.invalid('distill.alpha', d.alpha, 'expected a value in [0, 1]')
  if d.tau <= 0:
    raise config_lib.invalid('distill.tau', d.tau, 'expected > 0')


def ponder_loss(ponder: jax.Array, weight: float) -> jax.Array:
  """alpha_p * mean(rho) over images and tokens; ponder [B, N]."""
  return weight * ponder.mean()


def check_prior_target(depth: int, target_depth: float) -> None:
  """The prior's target depth mu must leave 1..L layers to sum over; raises
  config_lib.ConfigError."""
  if not 0 < int(target_depth) <= depth:
    raise config_lib.invalid('loss.prior_target_depth', target_depth,
                             f'expected a value in (0, {depth}] for a depth-{depth} model')


def prior_target(depth: int, target_depth: float, std: float) -> jax.Array:
  """Gaussian target T[l], l = 0..L-1, scaled so that T[0] + ... + T[mu-1] = 0.98.

  Deliberately not a distribution (its sum is above 1): that is the published prior.
  """
  check_prior_target(depth, target_depth)
  layers = jnp.arange(depth, dtype=jnp.float32)
  pdf = norm.pdf(layers, loc=target_depth, scale=std)
  return pdf * (0.98 / pdf[:int(target_depth)].sum())


def prior_loss(halting_mean: jax.Array, target: jax.Array, weight: float) -> jax.Array:
  """alpha_d * max(KL(T || D), 0), D = H / sum(H) clipped to [0.01, 0.99].

  KL is summed over layers and divided by L, as PyTorch's KLDivLoss('batchmean') does on a
  1-D input; the term only counts when positive (T is not normalised, so KL can be < 0).
  halting_mean: float32 [L]; target: float32 [L].
  """
  dist = jnp.clip(halting_mean / halting_mean.sum(), 0.01, 0.99)
  pointwise = jnp.where(target > 0, target * (jnp.log(target) - jnp.log(dist)), 0.0)
  kl = pointwise.sum() / halting_mean.shape[0]
  return weight * jnp.maximum(kl, 0.0)
