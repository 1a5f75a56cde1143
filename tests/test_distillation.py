"""Distilled DeiT / A-ViT: DeiT's distillation loss against PyTorch, the fine-tuning rules for
the distillation token, and the checks of a teacher before anything compiles."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avit_jax import config_lib, convert, models
from avit_jax.checkpoints import finetune
from avit_jax.models import flops
from avit_jax.models import halting as halting_lib
from avit_jax.training import losses, workdir
from tests import helpers

RNG = np.random.default_rng(0)


def _deit_distillation_loss(outputs_kd, teacher_outputs, kind, tau):
  """The distillation term of DeiT's DistillationLoss (its `losses.py`), in PyTorch."""
  outputs_kd, teacher_outputs = torch.tensor(outputs_kd), torch.tensor(teacher_outputs)
  if kind == 'soft':
    return (F.kl_div(F.log_softmax(outputs_kd / tau, dim=1),
                     F.log_softmax(teacher_outputs / tau, dim=1),
                     reduction='sum', log_target=True) * (tau * tau) / outputs_kd.numel())
  return F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))


@pytest.mark.parametrize('kind, tau', [('hard', 1.0), ('soft', 1.0), ('soft', 3.0)])
def test_distillation_loss_is_deits(kind, tau):
  student = RNG.normal(size=(6, 10)).astype(np.float32) * 3
  teacher = RNG.normal(size=(6, 10)).astype(np.float32) * 3
  got = losses.distillation_loss(student, teacher, kind, tau)
  want = _deit_distillation_loss(student, teacher, kind, tau)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_soft_distillation_of_a_head_that_agrees_is_zero():
  logits = RNG.normal(size=(4, 7)).astype(np.float32)
  np.testing.assert_allclose(float(losses.distillation_loss(logits, logits, 'soft', 2.0)), 0.0,
                             atol=1e-7)


def _flat(prefix_tokens: int, grid: int, dim: int = 8, classes: int = 5, distilled=None):
  distilled = prefix_tokens == 2 if distilled is None else distilled
  params = {'cls_token': RNG.normal(size=(1, 1, dim)).astype(np.float32),
            'pos_embed': RNG.normal(size=(1, prefix_tokens + grid * grid, dim)).astype(np.float32),
            'head.kernel': RNG.normal(size=(dim, classes)).astype(np.float32),
            'head.bias': RNG.normal(size=(classes,)).astype(np.float32)}
  if distilled:
    params.update({'dist_token': RNG.normal(size=(1, 1, dim)).astype(np.float32),
                   'head_dist.kernel': RNG.normal(size=(dim, classes)).astype(np.float32),
                   'head_dist.bias': RNG.normal(size=(classes,)).astype(np.float32)})
  return params


def _model_config(classes=5, image_size=28):
  config = config_lib.model_config('tiny')
  config.num_classes, config.image_size = classes, image_size
  return config


def test_a_distilled_checkpoint_loses_its_distillation_token_in_a_plain_model():
  distilled, template = _flat(2, 4), _flat(1, 4)
  params, changes = finetune.adapt_params(distilled, template, _model_config())
  assert changes == {'distillation_token': 'dropped'}
  assert set(params) == set(template)
  np.testing.assert_array_equal(params['pos_embed'],
                                np.delete(distilled['pos_embed'], 1, axis=1))
  np.testing.assert_array_equal(params['head.kernel'], distilled['head.kernel'])


def test_a_plain_checkpoint_gets_a_fresh_distillation_token_in_a_distilled_model():
  plain, template = _flat(1, 4), _flat(2, 4)
  params, changes = finetune.adapt_params(plain, template, _model_config())
  assert changes == {'head_dist_reinitialized': 'none in checkpoint -> 5',
                     'distillation_token': 'initialised'}
  assert set(params) == set(template)
  for name in ('dist_token', 'head_dist.kernel', 'head_dist.bias'):
    np.testing.assert_array_equal(params[name], template[name])
  pos = params['pos_embed']
  np.testing.assert_array_equal(pos[:, :1], plain['pos_embed'][:, :1])
  np.testing.assert_array_equal(pos[:, 1:2], template['pos_embed'][:, 1:2])
  np.testing.assert_array_equal(pos[:, 2:], plain['pos_embed'][:, 1:])


def test_a_distilled_checkpoint_is_resampled_with_both_special_tokens_kept():
  distilled, template = _flat(2, 4), _flat(2, 6, classes=3)
  params, changes = finetune.adapt_params(distilled, template, _model_config(classes=3))
  assert changes == {'head_reinitialized': '5 -> 3', 'head_dist_reinitialized': '5 -> 3',
                     'pos_embed_resampled': '4x4 -> 6x6'}
  assert params['pos_embed'].shape == template['pos_embed'].shape
  np.testing.assert_array_equal(params['pos_embed'][:, :2], distilled['pos_embed'][:, :2])
  np.testing.assert_array_equal(params['pos_embed'][:, 2:],
                                finetune.resample_pos_embed(distilled['pos_embed'], 6, 2)[:, 2:])
  np.testing.assert_array_equal(params['head_dist.kernel'], template['head_dist.kernel'])


def test_a_config_saved_before_a_field_existed_resumes_at_its_default():
  current = config_lib.flatten(config_lib.base_config())
  saved = {k: v for k, v in current.items() if not k.startswith('distill.')}
  saved.pop('model.distilled')
  assert workdir.config_differences(saved, current) == []
  current['model.distilled'] = True
  assert workdir.config_differences(saved, current) == [
      'model.distilled: workdir has False, this run has True']


@pytest.mark.parametrize('field, value, message', [
    ('kind', 'medium', "config.distill.kind='medium' is invalid: expected one of ('hard', 'soft')"),
    ('alpha', 1.5, 'config.distill.alpha=1.5 is invalid: expected a value in [0, 1]'),
    ('tau', 0.0, 'config.distill.tau=0.0 is invalid: expected > 0'),
])
def test_distillation_numbers_are_checked(field, value, message):
  config = config_lib.base_config()
  config.distill[field] = value
  with pytest.raises(config_lib.ConfigError) as e:
    losses.check_distill_config(config.distill)
  assert str(e.value) == message


# --- the distilled model against Hugging Face's PyTorch DeiT ----------------------------------

def _distilled_timm(seed, c):
  """A random distilled DeiT state dict with timm's names (N + 2 position embeddings)."""
  sd = helpers.random_timm(seed, c)
  rng = np.random.default_rng(seed + 100)
  sd['dist_token'] = rng.normal(0, 0.1, (1, 1, c.dim)).astype(np.float32)
  sd['pos_embed'] = np.insert(sd['pos_embed'], 1, rng.normal(0, 0.1, c.dim), axis=1)
  sd['head_dist.weight'] = rng.normal(0, 0.02, (c.num_classes, c.dim)).astype(np.float32)
  sd['head_dist.bias'] = rng.normal(0, 0.1, c.num_classes).astype(np.float32)
  return sd


def _timm_to_hf_distilled(sd):
  """timm names -> DeiTForImageClassificationWithTeacher's, independently of the converter."""
  plain = {k: v for k, v in sd.items() if k not in ('dist_token', 'head_dist.weight',
                                                     'head_dist.bias')}
  out = {}
  for name, value in helpers.timm_to_hf(plain).items():
    name = re.sub(r'^vit\.', 'deit.', name)
    out[re.sub(r'^classifier\.', 'cls_classifier.', name)] = value
  out['deit.embeddings.distillation_token'] = sd['dist_token']
  out['distillation_classifier.weight'] = sd['head_dist.weight']
  out['distillation_classifier.bias'] = sd['head_dist.bias']
  return out


def _hf_deit_with_teacher(sd, c):
  from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher
  return helpers.hf_model(DeiTForImageClassificationWithTeacher, DeiTConfig, c,
                          _timm_to_hf_distilled(sd))


def _hf_outputs(model, images):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  return out.logits.numpy(), out.distillation_logits.numpy()


@pytest.mark.parametrize('size, seed', [('tiny', 0), ('small', 1)])
def test_a_distilled_deit_converts_and_matches_hugging_face(tmp_path, size, seed):
  c = helpers.model_config(size, depth=2, image_size=64, num_classes=100)
  c.distilled = True
  sd = _distilled_timm(seed, c)
  images = np.random.default_rng(seed).normal(0, 1, (2, 64, 64, 3)).astype(np.float32)
  hf_logits, hf_dist = _hf_outputs(_hf_deit_with_teacher(sd, c), images)
  assert np.abs(hf_logits).max() > 0.1  # not a comparison of near-zero logits
  for source in (helpers.save_pth(tmp_path / 'deit_distilled.pth', sd),
                 _timm_to_hf_distilled(sd)):  # a timm file, and Hugging Face's names
    out = convert.from_torch(source, c)(images)
    np.testing.assert_allclose(out.logits, hf_logits, atol=1e-4)
    np.testing.assert_allclose(out.dist_logits, hf_dist, atol=1e-4)


def test_a_distilled_model_exports_to_what_pytorch_reloads(tmp_path):
  c = helpers.model_config('tiny', depth=2, image_size=64, num_classes=10)
  c.distilled = True
  model = models.create(c, seed=3)
  path = convert.export_file(_save(model, c, tmp_path / 'ckpt'), str(tmp_path / 'w.safetensors'))
  from safetensors.numpy import load_file
  sd = load_file(path)
  assert sd['pos_embed'].shape == (1, 18, 192) and 'dist_token' in sd and 'head_dist.weight' in sd
  images = np.random.default_rng(5).normal(0, 1, (2, 64, 64, 3)).astype(np.float32)
  hf_logits, hf_dist = _hf_outputs(_hf_deit_with_teacher(sd, c), images)
  out = model(images)
  np.testing.assert_allclose(hf_logits, out.logits, atol=1e-4)
  np.testing.assert_allclose(hf_dist, out.dist_logits, atol=1e-4)


def _save(model, c, directory):
  from flax import nnx
  from avit_jax import checkpoints
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return checkpoints.save_params(str(directory), params,
                                 {'model': checkpoints.metadata_json(c)})


# --- halting with two special tokens -----------------------------------------------------------

def _distilled_config(**overrides):
  c = config_lib.model_config('tiny')
  c.update(dict(image_size=16, patch=4, dim=32, depth=4, heads=4, num_classes=7,
                drop_path_rate=0.0, gate_scale=10.0, gate_center=5.0, distilled=True))
  c.update(overrides)
  return c


def _images(batch=3, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, 16, 16, 3), jnp.float32)


def _lift_halting_neuron(model, shift):
  for block in model.blocks:
    block.mlp.fc2.bias[...] = block.mlp.fc2.bias[...].at[0].add(shift)


def test_both_special_tokens_halt_like_any_token():
  model = models.create(_distilled_config(), seed=1)
  _lift_halting_neuron(model, 0.5)
  out = model(_images(batch=4))
  depth, rho = np.asarray(out.token_depth), np.asarray(out.ponder)
  scores = np.asarray(out.halting_scores)
  assert depth.shape == (4, 16 + 2) and out.dist_logits.shape == (4, 7)
  assert ((depth >= 1) & (depth <= model.depth)).all() and (depth == np.round(depth)).all()
  assert (depth[:, :2] < model.depth).all()  # the special tokens halted early
  assert len(np.unique(depth)) > 2  # a varied profile: the checks below are not vacuous
  for b in range(4):
    for k in range(depth.shape[1]):
      n = int(depth[b, k])
      np.testing.assert_allclose(rho[b, k], n + 1.0 - scores[b, :n - 1, k].sum(), atol=1e-5)
      cumulative = np.cumsum(scores[b, :, k])
      assert (cumulative[:n - 1] < 1 - model.eps).all()


def test_nothing_halting_early_gives_plain_distilled_deit():
  x = _images()
  plain = models.create(_distilled_config(halting=False), seed=3)(x)
  never = models.create(_distilled_config(gate_center=1e4), seed=3)(x)
  np.testing.assert_array_equal(np.asarray(never.logits), np.asarray(plain.logits))
  np.testing.assert_array_equal(np.asarray(never.dist_logits), np.asarray(plain.dist_logits))
  np.testing.assert_array_equal(np.asarray(never.token_depth), 4.0)


def test_each_token_accumulates_weights_summing_to_one():
  """With every residual branch zeroed each block passes its tokens through, so a token's
  accumulated output is its embedding times the sum of its weights: both heads then see
  what plain DeiT sees, however early the tokens halted."""
  models_ = [models.create(_distilled_config(halting=halting), seed=4) for halting in (True, False)]
  for model in models_:
    for block in model.blocks:
      for linear in (block.attn.proj, block.mlp.fc2):
        linear.kernel[...] = jnp.zeros_like(linear.kernel[...])
        linear.bias[...] = jnp.zeros_like(linear.bias[...])
  x = _images(seed=6)
  avit, deit = models_[0](x), models_[1](x)
  assert len(np.unique(np.asarray(avit.token_depth))) > 1
  np.testing.assert_allclose(np.asarray(avit.logits), np.asarray(deit.logits), atol=1e-5)
  np.testing.assert_allclose(np.asarray(avit.dist_logits), np.asarray(deit.dist_logits),
                             atol=1e-5)


def test_halted_tokens_never_change_either_head():
  model = models.create(_distilled_config(), seed=4)
  _lift_halting_neuron(model, 0.4)
  x = _images(batch=2, seed=5)
  reference = model(x)
  assert float(reference.token_depth.min()) < model.depth

  tokens = model.embed(x)  # AViT.run_halting, with garbage in place of halted tokens
  state = halting_lib.init_state(tokens.shape[:2])
  output = jnp.zeros(tokens.shape)
  for layer, block in enumerate(model.blocks):
    garbage = 1e3 * jax.random.normal(jax.random.key(layer), tokens.shape)
    tokens = block(jnp.where(state.mask[..., None] > 0, tokens, garbage), mask=state.mask)
    state, weight, _ = model.halting_step(state, tokens, layer)
    output = halting_lib.accumulate(output, tokens, weight)
  logits, dist_logits = model.forward_heads(model.norm(output))
  np.testing.assert_array_equal(np.asarray(state.depth), np.asarray(reference.token_depth))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(reference.logits), atol=1e-6)
  np.testing.assert_allclose(np.asarray(dist_logits), np.asarray(reference.dist_logits),
                             atol=1e-6)


def test_training_mode_logits_are_the_class_heads():
  model = models.create(_distilled_config(), seed=7)
  x = _images(seed=8)
  evaluated = model(x)
  model.train()
  trained = model(x)  # no dropout or drop path configured: the same forward
  np.testing.assert_allclose(np.asarray(trained.dist_logits), np.asarray(evaluated.dist_logits),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(evaluated.logits),
                             (np.asarray(trained.logits) + np.asarray(trained.dist_logits)) / 2,
                             atol=1e-6)


def test_flops_count_both_special_tokens_and_heads():
  distilled, plain = _distilled_config(), _distilled_config(distilled=False)
  c = plain
  tokens = (16 // 4) ** 2
  layer = lambda n: 4 * n * c.dim * c.dim + 2 * n * c.dim * 4 * c.dim + 2 * n * n * c.dim
  embed = tokens * 4 * 4 * 3 * c.dim
  assert models.num_tokens(distilled) == tokens + 2
  np.testing.assert_allclose(flops.dense_gflops(distilled) * 1e9,
                             embed + c.depth * layer(tokens + 2) + 2 * c.dim * 7)
  np.testing.assert_allclose(flops.dense_gflops(plain) * 1e9,
                             embed + c.depth * layer(tokens + 1) + c.dim * 7)


# --- training with a teacher -------------------------------------------------------------------

@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A plain-DeiT checkpoint for the tiny training config: a teacher as convert writes it."""
  config = helpers.tiny_config(**{'model.halting': False, 'model.dim': 48, 'model.heads': 3})
  directory = tmp_path_factory.mktemp('teacher') / 'ckpt'
  _save(models.create(config.model, seed=11), config.model, directory)
  return str(directory)


def _student_config(teacher, data_dir, **overrides):
  return helpers.tiny_config(**{'model.distilled': True, 'distill.teacher': teacher,
                                'data.data_dir': data_dir, **overrides})


def _first_step_terms(config, batch, devices, teacher_logits):
  """(the first train step's metrics, the ce and distill_loss terms computed outside it)."""
  from flax import nnx
  from avit_jax.training import sharding, train
  program, state = train.prepare_training(config, devices)
  student = nnx.merge(program.graphs.train, jax.device_get(state.params),
                      program.graphs.non_params)
  out = student(batch['images'])  # no dropout, drop path or mixup in this config
  targets = losses.smooth_labels(batch['labels'], 10, config.aug.label_smoothing)
  d = config.distill
  distill = (losses.soft_target_cross_entropy(out.dist_logits, targets) if teacher_logits is None
             else losses.distillation_loss(out.dist_logits, teacher_logits, d.kind, d.tau))
  want = {'ce': (1 - d.alpha) * losses.soft_target_cross_entropy(out.logits, targets),
          'distill_loss': d.alpha * distill}
  _, got = program.train_step(state, sharding.global_batch(batch, program.mesh))
  return {k: float(v) for k, v in got.items()}, want


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {'images': rng.normal(size=(32, 28, 28, 3)).astype(np.float32),
          'labels': rng.integers(0, 10, size=32).astype(np.int32)}


@pytest.mark.parametrize('kind', ['hard', 'soft'])
def test_the_teacher_trains_head_dist_inside_the_step(teacher_dir, fashion_mnist_dir, kind,
                                                      caplog):
  caplog.set_level(logging.INFO)
  config = _student_config(teacher_dir, fashion_mnist_dir, **{
      'distill.kind': kind, 'distill.alpha': 0.3, 'distill.tau': 2.0})
  batch = _batch()
  teacher, _ = models.load(teacher_dir)
  teacher_logits = teacher(batch['images']).logits
  metrics = []
  # The teacher is sharded like the student: 8 devices with fsdp=2 give 1 device's step
  # (checked for one kind: the two differ only in the loss, checked against PyTorch above).
  meshes = ((jax.devices()[:1], 1), (jax.devices(), 2))[:2 if kind == 'hard' else 1]
  for devices, fsdp in meshes:
    config.mesh.fsdp = fsdp
    got, want = _first_step_terms(config, batch, devices, teacher_logits)
    for name, value in want.items():
      np.testing.assert_allclose(got[name], float(value), rtol=2e-5, err_msg=name)
    metrics.append(got)
  for name in ('loss', 'ce', 'distill_loss', 'grad_norm'):
    for other in metrics[1:]:
      np.testing.assert_allclose(other[name], metrics[0][name], rtol=1e-5, err_msg=name)
  # Its cost is logged once per run, with what it is.
  assert caplog.text.count(f'teacher {teacher_dir} (DeiT, depth 3, width 48; {kind} '
                           'distillation, alpha 0.3): ') == len(meshes)


def test_without_a_teacher_both_heads_learn_the_labels(fashion_mnist_dir):
  config = _student_config('', fashion_mnist_dir)
  got, want = _first_step_terms(config, _batch(1), jax.devices()[:1], None)
  for name, value in want.items():
    np.testing.assert_allclose(got[name], float(value), rtol=2e-5, err_msg=name)


@pytest.mark.parametrize('overrides, message', [
    ({'model.distilled': False}, 'a teacher trains the distillation head: set '
     '--config.model.distilled=True'),
    ({'model.num_classes': 12}, 'the teacher has num_classes=10, image_size=28, in_chans=3, the '
     'student (config.model) num_classes=12, image_size=28, in_chans=3; expected the same '
     'classes and images'),
    ({'model.image_size': 21}, 'the teacher has num_classes=10, image_size=28, in_chans=3, the '
     'student (config.model) num_classes=10, image_size=21, in_chans=3; expected the same '
     'classes and images'),
])
def test_a_teacher_that_does_not_fit_is_refused_before_compiling(teacher_dir, fashion_mnist_dir,
                                                                 overrides, message):
  from avit_jax.training import validation
  config = _student_config(teacher_dir, fashion_mnist_dir, **overrides)
  with pytest.raises(config_lib.ConfigError) as e:
    validation.validate_config(config)
  assert str(e.value) == f'config.distill.teacher={teacher_dir!r} is invalid: {message}'


def test_a_missing_teacher_is_named(tmp_path, fashion_mnist_dir):
  from avit_jax import checkpoints
  from avit_jax.training import validation
  config = _student_config(str(tmp_path / 'nowhere'), fashion_mnist_dir)
  with pytest.raises(checkpoints.CheckpointError, match='nowhere'):
    validation.validate_config(config)
