"""Benchmark table: the arithmetic of its columns, on a tiny model (timings themselves untested)."""

import numpy as np
import pytest

from avit_jax import benchmark, flops, halting_profiles
from tests.test_inference import small_config, varied_model


@pytest.mark.slow
def test_rows_are_consistent():
  model = varied_model(0)
  config = small_config()
  images = np.asarray(halting_profiles.synthetic_images(4, 32, seed=0))
  rows = benchmark.bench_model('tiny-test', model, config, images, [1, 4], reps=1,
                               torch_seconds={1: (0.5, 0.9), 4: (1.0, 1.9)}, log=lambda s: None)
  assert [(r['batch'], r['mode']) for r in rows] == [
      (b, m) for b in (1, 4) for m in ('dense', 'masked', 'compact', 'pytorch')]
  dense = flops.dense_gflops(config)
  for r in rows:
    np.testing.assert_allclose(r['images_per_s'] * r['ms_per_batch'] / 1e3, r['batch'])
    np.testing.assert_allclose(r['efficiency'], r['speed_up'] / r['ideal_speed_up'])
    np.testing.assert_allclose(r['cpu_efficiency'], r['cpu_speed_up'] / r['ideal_speed_up'])
    if r['mode'] in ('dense', 'pytorch'):
      assert r['gflops_per_image'] == dense and r['ideal_speed_up'] == 1.0
    else:
      np.testing.assert_allclose(r['ideal_speed_up'], dense / r['gflops_per_image'])
      assert r['gflops_per_image'] < dense  # this model halts early
    if r['mode'] == 'compact':
      assert r['depth_mismatches'] == 0 and r['max_logit_diff'] < 1e-4
      split = r['time_split']
      assert split['block_calls'] >= config.depth
      assert split['rows_rounding'] >= 1.0 and split['attention_padding'] >= 1.0
      assert 0.0 < split['block_flops_fraction'] < 1.0
      np.testing.assert_allclose(
          split['block_efficiency'],
          split['blocks_ideal_ms'] / (split['ms']['blocks'] + split['ms']['repack']))
      assert 'block efficiency' in benchmark.format_time_split(split)
  # The peer's (wall, CPU) seconds are reported as given.
  assert rows[3]['ms_per_batch'] == 500.0 and rows[3]['cpu_ms_per_batch'] == 900.0
  assert 'compact' in benchmark.format_table(rows)
  markdown = benchmark.format_markdown(rows)
  assert markdown.count('| 4 | compact |') == 1 and 'PyTorch (transformers ViT)' in markdown


def test_profile_hits_its_target():
  config = small_config(gate_center=10.0)
  calibration = halting_profiles.synthetic_images(8, 32, seed=1)
  _, info = halting_profiles.build(config, 0.6, calibration, iterations=12)
  assert abs(info['compute_fraction'] - 0.6) < 0.03
  assert info['token_depth_std_within_image'] > 0
