"""The accuracy-compute dial of a trained model: gate-centre shifts at inference, on a short run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avit_jax import inference, models
from avit_jax import tradeoff as tradeoff_command
from avit_jax.data import pipeline
from avit_jax.analysis import tradeoff
from avit_jax.training import train
from tests.helpers import tiny_config


@pytest.fixture(scope='module')
def run(tmp_path_factory, fashion_mnist_dir):
  workdir = str(tmp_path_factory.mktemp('tradeoff'))
  config = tiny_config(**{'data.data_dir': fashion_mnist_dir, 'num_eval_images': 128})
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])  # compiles fastest
  with open(os.path.join(workdir, 'eval.json')) as f:
    return workdir, config, json.load(f)


def test_shifts_reproduce_then_move_the_halting(run, tmp_path):
  workdir, config, trained = run
  result = tradeoff_command.main(['--checkpoint', workdir, '--out', str(tmp_path),
                          '--shifts=-1000,0,10000', '--timing-batch', '16', '--reps', '1'])
  rows = result['rows']
  zero = rows[1]
  # Shift 0 is the trained model: the metrics its run wrote.
  np.testing.assert_allclose(zero['top1'], trained['top1'], atol=1e-6)
  np.testing.assert_allclose(zero['gflops_per_image'], trained['gflops_per_image'], rtol=1e-5)
  # Compute grows with the shift; a huge early shift stops every token after layer 1, a
  # huge late one runs every token through every layer.
  gflops = [r['gflops_per_image'] for r in rows]
  assert gflops == sorted(gflops)
  assert rows[0]['mean_token_depth'] == 1.0
  assert rows[-1]['mean_token_depth'] == config.model.depth
  np.testing.assert_allclose(rows[-1]['compute_fraction'], 1.0, rtol=1e-6)
  assert all(r['images_per_s'] > 0 for r in rows)
  for name in ('tradeoff.json', 'tradeoff.md', 'tradeoff.png'):
    assert os.path.getsize(tmp_path / name) > 0
  assert '| +0 |' in (tmp_path / 'tradeoff.md').read_text()


def test_late_shift_gives_plain_deit_logits(run):
  """No score crosses before the last layer: the output is plain DeiT on the same weights."""
  workdir, config, _ = run
  late_config = config.model.copy_and_resolve_references()
  late_config.gate_center += 1e4
  model, _ = models.load(workdir, late_config)
  images = jnp.asarray(pipeline.eval_images(config, 8)[0])
  late = inference.make_predict_fn(model, 'masked')(images)
  dense = inference.make_predict_fn(model, 'dense')(images)
  np.testing.assert_allclose(late.logits, dense.logits, atol=1e-5)
  np.testing.assert_array_equal(late.token_depth, config.model.depth)


def test_eval_mode_takes_a_shifted_gate_centre_and_keeps_the_run_config(run, tmp_path):
  workdir, config, trained = run
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = f.read()
  eval_config = tiny_config(**{'data.data_dir': config.data.data_dir, 'num_eval_images': 128,
                               'mode': 'eval', 'model.gate_center': config.model.gate_center + 2})
  metrics = train.train_and_evaluate(eval_config, workdir, devices=jax.devices()[:1])
  # The later gate centre took effect: tokens halt later than in the run's own eval.
  assert metrics['mean_token_depth'] > trained['mean_token_depth'], (metrics, trained)
  assert metrics['gflops_per_image'] > trained['gflops_per_image'], (metrics, trained)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == saved


def test_a_bad_baseline_is_refused_before_any_work(run, tmp_path):
  workdir, _, _ = run
  out = tmp_path / 'out'
  missing = str(tmp_path / 'no_such_run')
  with pytest.raises(FileNotFoundError) as e:
    tradeoff_command.main(['--checkpoint', workdir, '--baseline', missing, '--out', str(out)])
  assert str(e.value) == (
      f'--baseline: {missing}/config.json not found: expected a training workdir (it holds the '
      'config.json its run wrote); train one with `python -m avit_jax.main --config CONFIG '
      '--workdir DIR --config.model.halting=False`')
  with pytest.raises(ValueError) as e:  # an A-ViT run is no "DeiT (no halting)" baseline
    tradeoff_command.main(['--checkpoint', workdir, '--baseline', workdir, '--out', str(out)])
  assert str(e.value).startswith(f'--baseline {workdir} is an A-ViT run (model.halting=True)')
  assert not out.exists()  # refused before the sweep wrote anything
