"""Benchmark tables: the arithmetic of their columns, on a tiny model (timings themselves untested)."""

import numpy as np
import pytest

from avit_jax import benchmark, inference
from avit_jax.models import flops
from avit_jax.benchmark import cli, measure, phases, profiles
from tests.helpers import small_config, varied_model


@pytest.mark.slow
def test_rows_are_consistent():
  model = varied_model(0)
  config = small_config()
  images = np.asarray(profiles.synthetic_images(4, 32, seed=0))
  rows, latency = benchmark.bench_model(
      'tiny-test', model, config, images, [1, 4], reps=1, compile_repeats=2,
      torch_seconds={1: (0.5, 0.9), 4: (1.0, 1.9)}, latency_images=3, log=lambda s: None)
  assert [(r['batch'], r['mode']) for r in rows] == [
      (b, m) for b in (1, 4) for m in ('dense', 'masked', 'compact', 'pytorch')]
  dense = flops.dense_gflops(config)
  for r in rows:
    np.testing.assert_allclose(r['images_per_s'] * r['ms_per_batch'] / 1e3, r['batch'])
    np.testing.assert_allclose(r['efficiency'], r['speed_up'] / r['ideal_speed_up'])
    dense_cpu = next(d['cpu_ms_per_batch'] for d in rows
                     if d['batch'] == r['batch'] and d['mode'] == 'dense')
    np.testing.assert_allclose(r['cpu_efficiency'],
                               dense_cpu / r['cpu_ms_per_batch'] / r['ideal_speed_up'])
    if r['mode'] in ('dense', 'pytorch'):
      assert r['gflops_per_image'] == dense and r['ideal_speed_up'] == 1.0
    else:
      np.testing.assert_allclose(r['ideal_speed_up'], dense / r['gflops_per_image'])
      assert r['gflops_per_image'] < dense  # this model halts early
    if r['mode'] != 'pytorch':
      assert r['host_reads'] == 0 and r['compile_s'] > 0
    if r['mode'] == 'compact':
      assert r['depth_mismatches'] == 0 and r['max_logit_diff'] < 1e-4
    if r['mode'] == 'compact':
      work = r['work']
      assert work['layout'] == ('sequence' if r['batch'] == 1 else 'packed')
      assert work['rows_rounding'] >= 1.0 and work['attention_padding'] >= 1.0
      # The ceiling: multiply-adds the halting needs (the masked model's GFLOPs) over those of
      # compact's padded shapes, each counted by hand.
      layers = {k: np.sum(v) for k, v in work['per_layer'].items()}
      d, hidden = config.dim, int(config.dim * config.mlp_ratio)
      outside = r['batch'] * flops.embed_head_gflops(config) * 1e9
      block = lambda mlp, att, pairs: mlp * 2 * d * hidden + att * 4 * d * d + pairs * 2 * d
      needed = outside + block(layers['rows_running'], layers['rows_running'],
                               layers['attention_running'])
      np.testing.assert_allclose(needed, r['batch'] * r['gflops_per_image'] * 1e9, rtol=1e-5)
      computed = outside + block(layers['rows_computed'], layers['attention_rows_computed'],
                                 layers['attention_computed'])
      np.testing.assert_allclose(work['efficiency_ceiling'], needed / computed, rtol=1e-6)
      assert 0.3 < work['efficiency_ceiling'] <= 1.0
  # The peer's (wall, CPU) seconds are reported as given.
  peer = rows[3]
  assert peer['ms_per_batch'] == 500.0 and peer['cpu_ms_per_batch'] == 900.0
  assert [r['mode'] for r in latency] == ['dense', 'masked', 'compact']
  for r in latency:
    assert r['samples'] == 3 and r['p90_ms'] >= r['median_ms'] > 0
  assert latency[0]['speed_up'] == 1.0 and latency[2]['ideal_speed_up'] > 1.0
  assert 'compact' in benchmark.format_table(rows)
  markdown = benchmark.format_markdown(dict(rows=rows, latency=latency, date='DAY',
                                            machine='HOST', command='CMD',
                                            auto={'tiny-test': {1: 'masked', 4: 'compact'}}))
  # Dated and named once, at the top.
  assert markdown.count('DAY') == markdown.count('HOST') == 1
  assert markdown.splitlines()[2].startswith('Measured on DAY on HOST, by `CMD`.')
  assert 'picks masked at batch 1, compact at batch 4 (the batch of its first call).' in markdown
  assert markdown.count('| 4 | compact |') == 1 and 'PyTorch (transformers ViT)' in markdown
  assert 'Batch-1 latency over 3 images' in markdown
  assert f'{rows[2]["work"]["efficiency_ceiling"]:.3f} | {rows[2]["efficiency"]:.2f} |' in markdown


def test_round_robin_pairs_each_round_and_rotates_the_order():
  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in 'abc'}
  timed = measure.time_round_robin(fns, reps=4)
  # A warm-up call each, then rounds that each start one fn later.
  assert calls == list('abc') + list('abc') + list('bca') + list('cab') + list('abc')
  assert all(len(t) == 4 for t in timed.rounds.values())
  assert set(timed.seconds) == set(timed.cpu_seconds) == set('abc')
  assert len(measure.time_round_robin(fns, reps=1, min_seconds=0.05).rounds['a']) > 1
  # The speed-up is the median of per-round ratios: here a slow spell hits a's second and
  # third calls and b's second only; the ratio of medians (10 / 5 = 2) would credit it to b.
  spell = measure.RoundRobin(seconds={}, cpu_seconds={},
                             rounds={'a': [1.0, 10.0, 10.0], 'b': [2.0, 20.0, 5.0]})
  assert spell.speed_up('b', 'a') == 0.5 and spell.speed_up('a', 'a') == 1.0


def test_profile_hits_its_target():
  config = small_config(gate_center=10.0)
  calibration = profiles.synthetic_images(8, 32, seed=1)
  _, info = profiles.build(config, 0.6, calibration, iterations=12)
  assert abs(info['compute_fraction'] - 0.6) < 0.03
  assert info['token_depth_std_within_image'] > 0


def test_phase_times_attribute_every_mode_to_its_phases():
  """The profile splits a forward's device time by the named scopes of the block, the
  halting step and token removal: dense has no halting, compact spends time in its repack,
  and every mode's phases add up to (most of) the traced time."""
  model = varied_model(0)
  images = np.asarray(profiles.synthetic_images(8, 32, seed=0))
  times = {mode: phases.phase_times(inference.make_predict_fn(model, mode), images, reps=1)
           for mode in ('dense', 'masked', 'compact')}
  for mode, t in times.items():
    assert set(t) == set(phases.PHASES) | {'other'}
    assert all(v >= 0 for v in t.values())
    assert t['attention'] > 0 and t['mlp'] > 0 and t['embed'] > 0, (mode, t)
    # The block's two branches are most of the work of every mode.
    assert t['attention'] + t['mlp'] > 0.3 * sum(t.values()), (mode, t)
  assert times['dense']['halting'] == 0 and times['dense']['repack'] == 0
  assert times['masked']['halting'] > 0 and times['compact']['repack'] > 0
  assert phases.phase_of('jit(f)/while/body/layout/attention/dot_general') == 'attention'
  assert phases.phase_of('jit(f)/while/body/dynamic_slice') == 'other'


@pytest.mark.parametrize('argv, message', [
    (['--quick', '--variants', 'small'], '--quick times DeiT-T geometry (--variants tiny) at '
     'batches up to 8; drop --quick to time --variants small --batch-sizes 1,8'),
    (['--quick', '--batch-sizes', '64'], '--quick times DeiT-T geometry (--variants tiny) at '
     'batches up to 8; drop --quick to time --variants tiny --batch-sizes 64'),
    (['--quick', '--variants', 'tiyn'], "--variants: 'tiyn' is not one of ['small', 'tiny']"),
    (['--variants', 'tiyn'], "--variants: 'tiyn' is not one of ['small', 'tiny']"),
    (['--quick', '--batch-sizes', 'x'], "--batch-sizes must be positive integers separated by "
     "commas (e.g. 1,8,64), got 'x'"),
])
def test_options_are_refused_before_any_work(argv, message, capsys):
  """With or without --quick: nothing is timed and the error names the option."""
  with pytest.raises(SystemExit) as e:
    benchmark.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines()[-1] == f'python -m avit_jax.benchmark: error: {message}'


def test_auto_picks_the_exact_mode_of_the_larger_speed_up():
  """The benchmark's 'auto picks' come from the speed-ups its table shows for compact and
  masked at each batch size, by the rule auto applies to its own timing; dense where no
  exact mode was timed."""
  rows = [dict(batch=b, mode=m, speed_up=x) for b, m, x in (
      (1, 'dense', 1.0), (1, 'masked', 0.8), (1, 'compact', 1.2),
      (8, 'dense', 1.0), (8, 'masked', 1.1), (8, 'compact', 0.9), (8, 'pytorch', 3.0))]
  assert cli.auto_picks(rows) == {1: 'compact', 8: 'masked'}
  assert cli.auto_picks([dict(batch=4, mode='dense', speed_up=1.0)]) == {4: 'dense'}


def test_compact_work_counts_what_the_program_computes():
  """The work the benchmark reports: the rows and attention the masked model's halting
  needs, and what compact computes for it: images sorted by running tokens, in groups of 2
  (batch 8), attention lengths in steps of 16 up to the 65 tokens, MLP rows in steps of 160
  then of 40 (a quarter step)."""
  model = varied_model(2)
  x = np.asarray(profiles.synthetic_images(8, 32, seed=2))
  masked = inference.make_predict_fn(model, 'masked')(x)
  predict = inference.make_predict_fn(model, 'compact')
  plan = predict.plan(8)
  assert (plan.layout, plan.lengths, plan.groups, plan.chunk_rows) == (
      'packed', (16, 32, 48, 64, 65), (2,) * 5, 160)
  work = cli.compact_layer_work(predict, masked.token_depth)
  depth = np.asarray(masked.token_depth)
  active = np.asarray(flops.active_tokens_per_layer(depth, model.depth))  # [B, L]
  assert sum(work['rows_running']) == active.sum() == depth.sum()
  assert sum(work['attention_running']) == (active ** 2).sum()
  for layer in range(model.depth):
    counts = np.sort(active[:, layer])[::-1]
    assert work['rows_computed'][layer] == -(-counts.sum() // 40) * 40
    lengths = [min(65, -(-int(g[0]) // 16) * 16) for g in counts.reshape(4, 2) if g[0]]
    assert work['attention_computed'][layer] == sum(2 * n ** 2 for n in lengths)
    assert work['attention_rows_computed'][layer] == sum(2 * n for n in lengths)
  # Batch 1: the sequence layout runs the whole block on the running count's bucket.
  one = cli.compact_layer_work(predict, depth[:1])
  assert one['rows_computed'] == one['attention_rows_computed'] == [
      min(65, -(-int(k) // 16) * 16) if k else 0 for k in active[0]]
