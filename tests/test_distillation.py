"""Distilled DeiT / A-ViT: DeiT's distillation loss against PyTorch, the fine-tuning rules for
the distillation token, and the checks of a teacher before anything compiles."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avit_jax import config_lib
from avit_jax.checkpoints import finetune
from avit_jax.training import losses, workdir

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
