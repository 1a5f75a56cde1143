"""Multiply-add counts against the published DeiT numbers and hand-worked small cases."""

import jax.numpy as jnp
import numpy as np

from avit_jax import config_lib
from avit_jax.models import flops


def test_dense_deit_matches_published_gflops():
  # DeiT-T 1.3, DeiT-S 4.6, DeiT-B 17.6 GFLOPs (multiply-adds) at 224.
  np.testing.assert_allclose(flops.dense_gflops(config_lib.model_config('tiny')), 1.2537, atol=1e-3)
  np.testing.assert_allclose(flops.dense_gflops(config_lib.model_config('small')), 4.5989, atol=1e-3)
  np.testing.assert_allclose(flops.dense_gflops(config_lib.model_config('base')), 17.5638, atol=1e-3)


def _tiny_geometry():
  c = config_lib.model_config('tiny')
  c.update(dict(image_size=8, patch=4, dim=2, depth=2, heads=1, num_classes=3, mlp_ratio=2.0))
  return c


def test_hand_worked_small_model():
  c = _tiny_geometry()
  # 4 patches x (4*4*3 inputs x 2) = 384; per token per layer 4*2*2 + 2*2*4 = 32; head 2*3 = 6.
  # depths: cls 2, patches 1,1,2,2 -> layer 0: 5 tokens, layer 1: 3 tokens.
  depth = jnp.array([[2.0, 1.0, 1.0, 2.0, 2.0]])
  layer0 = 5 * 32 + 2 * 25 * 2
  layer1 = 3 * 32 + 2 * 9 * 2
  np.testing.assert_allclose(flops.gflops_per_image(depth, c), [(384 + layer0 + layer1 + 6) / 1e9])
  np.testing.assert_array_equal(flops.active_tokens_per_layer(depth, 2), [[5, 3]])
  full = jnp.full((1, 5), 2.0)
  np.testing.assert_allclose(flops.gflops_per_image(full, c), [flops.dense_gflops(c)], rtol=1e-6)


def test_block_macs_of_a_padded_layout():
  c = _tiny_geometry()  # D = 2, hidden 4: fc1 + fc2 16, qkv + proj 16 per row, 2 * D per pair
  np.testing.assert_allclose(flops.block_macs(10, 12, 50, c), 10 * 16 + 12 * 16 + 50 * 4)
  np.testing.assert_allclose(flops.block_macs(5, 5, 25, c), flops.layer_macs(5, c))


def test_summary_fraction():
  c = config_lib.model_config('tiny')
  depth = jnp.full((2, 197), 12.0).at[1, 1:].set(6.0)
  summary = flops.gflops_summary(depth, c)
  dense = flops.dense_gflops(c) * 1e9
  layer = lambda n: n * 12 * 192 * 192 + 2 * n * n * 192
  half = dense - 6 * layer(197) + 6 * layer(1)  # patch tokens stop after 6 layers
  np.testing.assert_allclose(summary['gflops_per_image'], (dense + half) / 2e9, rtol=1e-6)
  np.testing.assert_allclose(summary['compute_fraction'], (1 + half / dense) / 2, rtol=1e-6)
  np.testing.assert_allclose(summary['dense_gflops_per_image'], 1.2536832, rtol=1e-6)
