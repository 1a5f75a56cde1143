"""Where an evaluation writes: the run's own eval.json only for a plain re-evaluation of the
run's config with no training run holding the workdir; a diagnostic (an inference-time
override) or a side evaluation beside a training run goes under evals/, and a failed one
leaves nothing behind."""

import json
import os

import jax
import pytest

from avit_jax import checkpoints
from avit_jax.training import train
from avit_jax.training.workdir import Workdir
from tests.helpers import tiny_config


@pytest.fixture(scope='module')
def trained(tmp_path_factory, fashion_mnist_dir):
  """A tiny finished run: its workdir and config."""
  workdir = str(tmp_path_factory.mktemp('run') / 'run')
  config = tiny_config(**{'data.data_dir': fashion_mnist_dir})
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir, config


def _evaluate(workdir: str, config, **overrides) -> dict:
  config = tiny_config(**{'data.data_dir': config.data.data_dir, 'mode': 'eval', **overrides})
  return train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])


def _read(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _events(workdir: str) -> list[str]:
  return sorted(n for n in os.listdir(workdir) if n.startswith('events.out.tfevents'))


def test_an_eval_with_an_override_leaves_eval_json_alone(trained):
  workdir, config = trained
  eval_json = os.path.join(workdir, 'eval.json')
  with open(eval_json, 'rb') as f:
    before = f.read()
  events = _events(workdir)
  shifted = _evaluate(workdir, config, **{'model.gate_center': 6.0})
  with open(eval_json, 'rb') as f:
    assert f.read() == before
  assert _events(workdir) == events  # nothing added to the run's curves
  written = _read(os.path.join(workdir, 'evals', 'step_8-model.gate_center=6.0.json'))
  assert written == shifted and written['overrides'] == {'model.gate_center': 6.0}
  assert written['step'] == json.loads(before)['step'] == 8
  assert written['mean_token_depth'] != json.loads(before)['mean_token_depth']
  fewer = _evaluate(workdir, config, num_eval_images=128)
  assert fewer['num_images'] == 128 and fewer['overrides'] == {'num_eval_images': 128}
  assert os.path.exists(os.path.join(workdir, 'evals', 'step_8-num_eval_images=128.json'))
  # The plain re-evaluation of the run's config is the run's own result: eval.json, the same
  # numbers as training's final evaluation.
  again = _evaluate(workdir, config)
  assert 'overrides' not in again
  saved = _read(eval_json)
  for key in ('step', 'num_images', 'top1', 'top5', 'mean_token_depth', 'eval_loss'):
    assert saved[key] == again[key] == json.loads(before)[key], key


def test_an_eval_beside_a_training_run_writes_nothing_the_trainer_writes(trained):
  workdir, config = trained
  eval_json = os.path.join(workdir, 'eval.json')
  with open(eval_json, 'rb') as f:
    before = f.read()
  with Workdir(workdir, config):  # a training run holds the workdir's lock
    side = _evaluate(workdir, config)
  with open(eval_json, 'rb') as f:
    assert f.read() == before
  assert _read(os.path.join(workdir, 'evals', 'step_8.json')) == side
  assert side['overrides'] == {} and side['top1'] == json.loads(before)['top1']


def test_a_failed_eval_leaves_no_directory(tmp_path, fashion_mnist_dir):
  missing = tmp_path / 'missing'
  with pytest.raises(checkpoints.CheckpointError, match='no checkpoint under'):
    _evaluate(str(missing), tiny_config(**{'data.data_dir': fashion_mnist_dir}))
  assert not missing.exists()
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(checkpoints.CheckpointError, match='no checkpoint under'):
    _evaluate(str(empty), tiny_config(**{'data.data_dir': fashion_mnist_dir}))
  assert os.listdir(empty) == []
