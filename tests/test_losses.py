"""Losses against hand-worked values and PyTorch's KLDivLoss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from avit_jax import config_lib, models
from avit_jax.training import losses


def test_prior_target_matches_hand_computed_gaussian():
  target = np.asarray(losses.prior_target(12, 8, 1.0))
  pdf = [math.exp(-0.5 * (l - 8) ** 2) / math.sqrt(2 * math.pi) for l in range(12)]
  scale = 0.98 / sum(pdf[:8])
  np.testing.assert_allclose(target, np.array(pdf) * scale, rtol=1e-6)
  np.testing.assert_allclose(target[:8].sum(), 0.98, rtol=1e-6)
  np.testing.assert_allclose(target.sum(), 3.2605, rtol=1e-4)  # not a distribution, by design


def test_prior_target_rejects_depth_outside_model():
  with pytest.raises(config_lib.ConfigError) as e:
    losses.prior_target(6, 8, 1.0)
  assert str(e.value) == ('config.loss.prior_target_depth=8 is invalid: expected a value in '
                          '(0, 6] for a depth-6 model')


def test_prior_loss_matches_torch_kldiv_batchmean():
  target = losses.prior_target(12, 8, 1.0)
  halting_mean = jnp.linspace(0.02, 0.3, 12)
  got = float(losses.prior_loss(halting_mean, target, weight=1e-3))
  dist = np.clip(np.asarray(halting_mean) / float(halting_mean.sum()), 0.01, 0.99)
  reference = torch.nn.KLDivLoss(reduction='batchmean')(
      torch.log(torch.tensor(dist)), torch.tensor(np.asarray(target), dtype=torch.float64))
  hand = sum(t * (math.log(t) - math.log(d)) for t, d in zip(np.asarray(target), dist)) / 12
  np.testing.assert_allclose(float(reference), hand, rtol=1e-6)
  np.testing.assert_allclose(got, 1e-3 * hand, rtol=1e-5)
  assert got > 0


def test_prior_loss_is_dropped_when_negative():
  # A uniform D against an unnormalised T: KL(T||D) can be negative; then the term is 0.
  target = jnp.array([0.01, 0.01, 0.01, 0.01])
  halting_mean = jnp.array([0.7, 0.1, 0.1, 0.1])
  kl = sum(t * (math.log(t) - math.log(d)) for t, d in zip([0.01] * 4, [0.7, 0.1, 0.1, 0.1])) / 4
  assert kl < 0
  assert float(losses.prior_loss(halting_mean, target, 1.0)) == 0.0


def test_ponder_loss_hand_value():
  rho = jnp.array([[1.0, 2.5], [3.0, 4.5]])
  np.testing.assert_allclose(float(losses.ponder_loss(rho, 5e-4)), 5e-4 * 2.75, rtol=1e-7)


def test_soft_target_cross_entropy_with_label_smoothing():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  targets = losses.smooth_labels(jnp.array([0]), 3, 0.1)
  np.testing.assert_allclose(targets, [[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]], rtol=1e-6)
  log_z = math.log(math.exp(2) + 1 + math.exp(-1))
  hand = -(targets[0, 0] * (2 - log_z) + targets[0, 1] * (0 - log_z) + targets[0, 2] * (-1 - log_z))
  np.testing.assert_allclose(float(losses.soft_target_cross_entropy(logits, targets)), hand,
                             rtol=1e-6)


def test_gradients_are_finite_and_reach_the_halting_channel():
  from flax import nnx

  config = config_lib.model_config('tiny')
  config.update(dict(image_size=16, patch=4, dim=32, depth=4, heads=4, num_classes=5,
                     drop_path_rate=0.0, gate_center=5.0))
  model = models.create(config, seed=0)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  target = losses.prior_target(4, 3, 1.0)

  def halting_terms(model):
    out = model(x)
    return losses.ponder_loss(out.ponder, 5e-4) + losses.prior_loss(out.halting_mean, target, 1e-3)

  grads = nnx.grad(halting_terms)(model)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  # The halting neuron is channel 0 of each block's output: fc2's bias column 0.
  for i in range(config.depth - 1):
    assert abs(float(grads['blocks'][i]['mlp']['fc2']['bias'][0])) > 0
  # Halting-only losses touch no other output channel's bias directly... except via
  # later layers; the last block's channels other than 0 feed nothing that halts.
  last = grads['blocks'][config.depth - 1]['mlp']['fc2']['bias']
  np.testing.assert_array_equal(np.asarray(last[1:]), 0.0)
