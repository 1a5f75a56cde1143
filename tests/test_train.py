"""Training: schedule and decay mask by hand, a real short run, resume after preemption, eval-only,
8 vs 1 device."""

import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from avit_jax import checkpoints, config_lib, models
from avit_jax.checkpoints import finetune
from avit_jax.training import optim, sharding, train
from configs import fashion_mnist
from tests.helpers import sigterm_at, tiny_config


def test_schedule_matches_hand_values():
  config = fashion_mnist.get_config().optimizer
  config.lr, config.warmup_lr, config.min_lr, config.warmup_epochs = 5e-4, 1e-6, 1e-5, 2.0
  lr = optim.schedule(config, batch_size=1024, total_steps=100, steps_per_epoch=10)
  peak = 5e-4 * 1024 / 512
  np.testing.assert_allclose(lr(0), 1e-6, rtol=1e-5)  # float32
  np.testing.assert_allclose(lr(10), 1e-6 + (peak - 1e-6) / 2, rtol=1e-6)
  np.testing.assert_allclose(lr(20), peak, rtol=1e-6)
  mid = 1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * 40 / 80))
  np.testing.assert_allclose(lr(60), mid, rtol=1e-5)
  np.testing.assert_allclose(lr(100), 1e-5, rtol=1e-5)


def test_weight_decay_mask():
  model = models.create(tiny_config().model, seed=0)
  mask = nnx.to_pure_dict(optim.decay_mask(nnx.state(model, nnx.Param)))
  assert mask['blocks'][0]['attn']['qkv']['kernel'] is True
  assert mask['blocks'][0]['mlp']['fc2']['kernel'] is True
  assert mask['patch_embed']['proj']['kernel'] is True
  assert mask['head']['kernel'] is True
  for no_decay in (mask['blocks'][0]['attn']['qkv']['bias'], mask['blocks'][1]['norm1']['scale'],
                   mask['norm']['bias'], mask['pos_embed'], mask['cls_token'],
                   mask['head']['bias']):
    assert no_decay is False
  # AdamW with that mask: a bias with zero gradient is left alone, a kernel decays.
  tx = optax.adamw(0.1, weight_decay=0.5, mask=optim.decay_mask)
  params = {'w': jnp.ones((2, 2)), 'b': jnp.ones((2,))}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(updates['b'], 0.0)


def _params(state):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))


@pytest.fixture(scope='module')
def trained(tmp_path_factory, fashion_mnist_dir):
  """One uninterrupted 8-step run, shared by the tests below."""
  workdir = str(tmp_path_factory.mktemp('full'))
  config = tiny_config(**{'data.data_dir': fashion_mnist_dir})
  program, untrained = train.prepare_training(config)
  initial = train.evaluate_split(program.eval_step, untrained.params, config, program.mesh)
  metrics = train.train_and_evaluate(config, workdir)
  metrics['initial_eval_loss'] = initial['eval_loss']
  return config, workdir, metrics


def test_short_run_writes_eval_json_and_checkpoints(trained):
  config, workdir, metrics = trained
  with open(os.path.join(workdir, 'eval.json')) as f:
    written = json.load(f)
  assert written['step'] == 8
  for key in ('top1', 'top5', 'eval_loss', 'mean_token_depth', 'active_token_fraction_per_layer',
              'gflops_per_image', 'images_per_second'):
    assert key in written
  assert written['num_images'] == 256
  # It learned: the eval loss fell from the untrained model's, accuracy is above chance.
  assert written['eval_loss'] < metrics['initial_eval_loss'] - 0.02
  assert written['top1'] > 0.13  # chance: 0.10
  assert 0.0 <= written['top1'] <= written['top5'] <= 1.0
  assert len(written['active_token_fraction_per_layer']) == 3
  assert written['active_token_fraction_per_layer'][0] == 1.0
  assert 1.0 <= written['mean_token_depth'] <= 3.0
  # Checkpoints every 4 of 8 steps, both kept (keep_checkpoints defaults to 3).
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '8']
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['dim'] == 32
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))


def test_resume_reproduces_uninterrupted_run(trained, tmp_path, monkeypatch):
  config, full_dir, _ = trained
  workdir = str(tmp_path / 'resumed')
  with monkeypatch.context() as patch:
    sigterm_at(patch, 3)  # preempted after step 4: its checkpoint is written, then it stops
    with pytest.raises(train.Preempted, match='stopped at step 4 after writing checkpoint'):
      train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4']
  metrics = train.train_and_evaluate(config, workdir)  # resumes from step 4 by itself
  assert metrics['step'] == 8
  full, _ = checkpoints.load_params(os.path.join(full_dir, 'checkpoints', '8'))
  resumed, _ = checkpoints.load_params(os.path.join(workdir, 'checkpoints', '8'))
  resumed, full = config_lib.flatten(resumed), config_lib.flatten(full)
  assert resumed.keys() == full.keys()
  for name in full:  # bitwise: same data order, same keys, same arithmetic
    np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)


def test_eval_only_matches_training_eval(trained):
  config, workdir, metrics = trained
  eval_config = tiny_config(**{'data.data_dir': config.data.data_dir, 'mode': 'eval'})
  again = train.train_and_evaluate(eval_config, workdir)
  assert again['step'] == 8
  np.testing.assert_allclose(again['top1'], metrics['top1'], rtol=0, atol=0)
  np.testing.assert_allclose(again['eval_loss'], metrics['eval_loss'], rtol=1e-6)
  np.testing.assert_allclose(again['mean_token_depth'], metrics['mean_token_depth'], rtol=1e-6)


@contextlib.contextmanager
def backend_compiles():
  """The names of the functions XLA compiles inside the block (jax.monitoring's compile
  events: one per compilation, none for a cached executable)."""
  names = []

  def listen(event, duration, **kwargs):
    del duration
    if event == '/jax/core/compile/backend_compile_duration':
      names.append(kwargs.get('fun_name', ''))
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def test_eight_devices_and_fsdp_match_one_device(fashion_mnist_dir):
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 fake CPU devices'
  # Adam with eps 1e-8 maps a near-zero gradient's rounding noise to a +-lr step (the key
  # bias's gradient is exactly zero in exact arithmetic); eps 1e-3 keeps the update a smooth
  # function of the gradient, so 1e-5 relative is a meaningful check of the sharded math.
  config = tiny_config(**{'data.data_dir': fashion_mnist_dir, 'optimizer.eps': 1e-3})
  rng = np.random.default_rng(0)
  batches = [{'images': rng.normal(size=(32, 28, 28, 3)).astype(np.float32),
              'labels': rng.integers(0, 10, size=32).astype(np.int32)} for _ in range(3)]
  results = []
  for devices, fsdp in ((jax.devices()[:1], 1), (jax.devices(), 1), (jax.devices(), 2)):
    config.mesh.fsdp = fsdp
    program, state = train.prepare_training(config, devices)
    losses = []
    with backend_compiles() as compiled:
      for batch in batches:
        state, metrics = program.train_step(state, sharding.global_batch(batch, program.mesh))
        losses.append(float(metrics['loss']))
    assert [name for name in compiled if 'train_step' in name] == ['jit(train_step)'], compiled
    if fsdp > 1:  # parameters really are split: a [D, 3D] kernel lives in halves
      qkv = state.params['blocks'][0]['attn']['qkv']['kernel']
      assert qkv[...].sharding.shard_shape(qkv[...].shape) == (32, 48)
    results.append((losses, _params(state)))
  (loss1, params1), (loss8, params8), (loss_fsdp, params_fsdp) = results
  np.testing.assert_allclose(loss_fsdp, loss1, rtol=1e-5)
  for name, value in config_lib.flatten(params1).items():
    np.testing.assert_allclose(config_lib.flatten(params_fsdp)[name], value, rtol=1e-5,
                               atol=1e-5 * np.abs(value).max(), err_msg=name)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  flat8, flat1 = config_lib.flatten(params8), config_lib.flatten(params1)
  for name in flat1:
    a, b = flat8[name], flat1[name]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=name)


def test_ema_of_parameters_matches_hand_recursion(fashion_mnist_dir):
  config = tiny_config(**{'data.data_dir': fashion_mnist_dir, 'optimizer.ema_decay': 0.9})
  program, state = train.prepare_training(config, jax.devices()[:1])
  rng = np.random.default_rng(1)
  expected = config_lib.flatten(_params(state))
  for _ in range(2):
    batch = {'images': rng.normal(size=(32, 28, 28, 3)).astype(np.float32),
             'labels': rng.integers(0, 10, size=32).astype(np.int32)}
    state, _ = program.train_step(state, sharding.global_batch(batch, program.mesh))
    params = config_lib.flatten(_params(state))
    expected = {k: 0.9 * expected[k] + 0.1 * params[k] for k in params}
  ema = config_lib.flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(state.ema_params)))
  for name in expected:
    np.testing.assert_allclose(ema[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_init_from_fits_head_and_pos_embed_to_the_model(tmp_path, caplog):
  """init_from a checkpoint of 7 classes on 21 x 21 images (3 x 3 patches) into a 10-class
  28 x 28 model (4 x 4): the native fine-tuning rules, no PyTorch layout on the way."""
  source_config = tiny_config(**{'model.num_classes': 7, 'model.image_size': 21})
  saved = nnx.to_pure_dict(nnx.state(models.create(source_config.model, seed=5), nnx.Param))
  checkpoints.save_params(str(tmp_path / 'ckpt'), saved, {})
  source = config_lib.flatten(jax.tree.map(np.asarray, saved))
  config = tiny_config(**{'init_from': str(tmp_path / 'ckpt'), 'seed': 3})
  with caplog.at_level(logging.WARNING):
    loaded = config_lib.flatten(nnx.to_pure_dict(nnx.state(train.create_model(config),
                                                           nnx.Param)))
  assert ('Checkpoint head classes 7 -> 10 (config.model.num_classes): re-initialising'
          in caplog.text)
  assert 'Resampled pos_embed from a 3x3 to a 4x4 patch grid' in caplog.text
  fresh = config_lib.flatten(nnx.to_pure_dict(nnx.state(models.create(config.model, seed=3),
                                                        nnx.Param)))
  assert loaded.keys() == fresh.keys()
  for name in loaded:
    if name.startswith('head.'):  # the model's own fresh head (seed 3)
      np.testing.assert_array_equal(loaded[name], fresh[name], err_msg=name)
    elif name == 'pos_embed':
      np.testing.assert_array_equal(loaded[name], finetune.resample_pos_embed(source[name], 4))
    else:  # everything else as saved
      np.testing.assert_array_equal(loaded[name], source[name], err_msg=name)


def test_train_and_evaluate_from_python_logs_its_progress(tmp_path, fashion_mnist_dir):
  """Called from a script (no absl flags parsed), it prints the command's step and eval lines,
  writes the same numbers as TensorBoard scalars, and never loads PyTorch (installed here for
  conversion)."""
  run = tmp_path / 'run'
  script = (f'import sys\n'
            f'from tests.helpers import tiny_config\n'
            f'from avit_jax.training import train\n'
            f'train.train_and_evaluate(tiny_config(**{{"data.data_dir": {fashion_mnist_dir!r}}}), '
            f'{str(run)!r})\n'
            f'print("torch loaded:", "torch" in sys.modules)\n')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, '-c', script], cwd=repo, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=repo), timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines()[-1] == 'torch loaded: False'
  lines = done.stderr.splitlines()
  steps = [l for l in lines if ' epoch ' in l]
  assert [l.split(' epoch')[0].split('absl:')[-1] for l in steps] == ['step 4/8', 'step 8/8']
  assert any('eval step 8: top1 ' in l for l in lines)
  # The events hold what the log lines print (float32 scalars) and what eval.json holds.
  import tensorflow as tf
  scalars = {}
  for name in os.listdir(run):
    if name.startswith('events.out.tfevents'):
      for event in tf.compat.v1.train.summary_iterator(str(run / name)):
        for value in event.summary.value:
          scalars[value.tag, event.step] = value.simple_value
  logged_losses = [float(l.split('| loss ')[1].split()[0]) for l in steps]
  np.testing.assert_allclose([scalars['train/loss', 4], scalars['train/loss', 8]],
                             logged_losses, atol=5e-5)
  with open(run / 'eval.json') as f:
    written = json.load(f)
  for key, tag in (('top1', 'top1'), ('eval_loss', 'loss'), ('mean_token_depth',
                                                              'mean_token_depth')):
    assert scalars[f'eval/test/{tag}', 8] == np.float32(written[key]), key


def test_logged_images_per_second_count_training_steps_only(tmp_path, monkeypatch,
                                                            fashion_mnist_dir):
  """On a fake clock where compiling takes 50 s, a train step 1 s and an evaluation 100 s,
  every logged rate is batch_size images per second: neither the compile nor an eval counts."""
  clock = [0.0]
  monkeypatch.setattr(train, 'time', type('FakeTime', (), {
      'perf_counter': staticmethod(lambda: clock[0])}))
  real_prepare, real_evaluate = train.prepare_training, train.evaluate_split

  def prepare(config, devices=None):
    program, state = real_prepare(config, devices)
    calls = []

    def step(state, batch):
      clock[0] += 1.0 if calls else 51.0
      calls.append(1)
      return program.train_step(state, batch)
    return dataclasses.replace(program, train_step=step), state

  def evaluate(*args, **kwargs):
    clock[0] += 100.0
    return real_evaluate(*args, **kwargs)

  logged = {}
  real_log = train.MetricWriter.train_step

  def log(self, step, total, metrics, **kwargs):
    logged[step] = kwargs['images_per_second']
    return real_log(self, step, total, metrics, **kwargs)

  monkeypatch.setattr(train, 'prepare_training', prepare)
  monkeypatch.setattr(train, 'evaluate_split', evaluate)
  monkeypatch.setattr(train.MetricWriter, 'train_step', log)
  config = tiny_config(**{'data.data_dir': fashion_mnist_dir, 'log_every_steps': 2,
                          'eval_every_steps': 4})
  train.train_and_evaluate(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  assert logged == {2: 32.0, 4: 32.0, 6: 32.0, 8: 32.0}
