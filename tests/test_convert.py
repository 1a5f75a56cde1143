"""Weight conversion: logits against Hugging Face's PyTorch ViT, round trips, bad input, CLI."""

import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from avit_jax import checkpoints, config_lib, convert, models
from avit_jax.convert.torch_io import ConvertError
from tests.helpers import hf_model, model_config, params_of, random_timm, save_pth, timm_to_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)


def hf_vit(sd, c):
  from transformers import ViTConfig, ViTForImageClassification
  return hf_model(ViTForImageClassification, ViTConfig, c, timm_to_hf(sd))


def hf_logits(model, images):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()


def images(seed, c, batch=2):
  rng = np.random.default_rng(1000 + seed)
  return rng.normal(0, 1, (batch, c.image_size, c.image_size, 3)).astype(np.float32)


# --- exactness against Hugging Face's PyTorch ViT ---------------------------------------------


def check_against_hf(tmp_path, seed, c):
  sd = random_timm(seed, c)
  model = convert.from_torch(save_pth(tmp_path / f'deit_{seed}.pth', sd), c)
  x = images(seed, c)
  ours = np.asarray(model(x).logits)
  ref = hf_logits(hf_vit(sd, c), x)
  assert ours.shape == (2, c.num_classes)
  diff = np.abs(ours - ref).max()
  assert diff <= 1e-4, diff
  assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero logits
  return diff


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_tiny_reduced_depth_matches_hf(tmp_path, seed):
  check_against_hf(tmp_path, seed, model_config('tiny', depth=3, num_classes=100))


@pytest.mark.parametrize('size,seed', [('tiny', 3), ('small', 4)])
def test_full_depth_224_matches_hf(tmp_path, size, seed):
  check_against_hf(tmp_path, seed, model_config(size))


def test_base_width_matches_hf(tmp_path):
  """ViT-B's width and heads (768, 12); its depth is tiny's and small's above."""
  check_against_hf(tmp_path, 5, model_config('base', depth=2))


@pytest.mark.parametrize('old_names,filename', [(False, 'model.safetensors'),
                                                (True, 'pytorch_model.bin')])
def test_hugging_face_checkpoint_matches_hf(tmp_path, old_names, filename):
  c = model_config('tiny', depth=2, image_size=64, num_classes=10)
  sd = random_timm(7, c)
  hf = timm_to_hf(sd, old_names=old_names)
  path = tmp_path / filename
  if filename.endswith('.safetensors'):
    from safetensors.numpy import save_file
    save_file(hf, str(path))
  else:
    save_pth(path, hf, wrap=False)
  model = convert.from_torch(str(tmp_path), c)  # a model directory: finds the weight file
  for k, v in convert.to_torch_state_dict(model).items():
    np.testing.assert_array_equal(v, sd[k])
  x = images(7, c)
  reference = hf_vit(sd, c)
  diff = np.abs(np.asarray(model(x).logits) - hf_logits(reference, x)).max()
  assert diff <= 1e-4, diff
  # The live model's torch tensors work as well.
  from_module = convert.from_torch(reference.state_dict(), c)
  np.testing.assert_array_equal(params_of(from_module)['blocks.1.attn.qkv.kernel'],
                                params_of(model)['blocks.1.attn.qkv.kernel'])


def test_halting_neuron_is_copied_exactly(tmp_path):
  c = model_config('tiny', depth=3, image_size=64, num_classes=10, halting=True)
  c.gate_scale, c.gate_center = 7.0, 3.0
  sd = random_timm(8, c)
  model = convert.from_torch(save_pth(tmp_path / 'avit.pth', sd), c)
  assert (model.halting, model.gate_scale, model.gate_center) == (True, 7.0, 3.0)
  p = params_of(model)
  for i in range(c.depth):
    for layer in ('attn.proj', 'mlp.fc2'):  # the residual writes into channel 0
      kernel = np.asarray(p[f'blocks.{i}.{layer}.kernel'])
      bias = np.asarray(p[f'blocks.{i}.{layer}.bias'])
      np.testing.assert_array_equal(kernel[:, 0], sd[f'blocks.{i}.{layer}.weight'][0])
      np.testing.assert_array_equal(bias[0], sd[f'blocks.{i}.{layer}.bias'][0])
      np.testing.assert_array_equal(kernel, sd[f'blocks.{i}.{layer}.weight'].T)
  out = model(images(8, c))
  assert np.all((np.asarray(out.token_depth) >= 1) & (np.asarray(out.token_depth) <= c.depth))


# --- round trips -------------------------------------------------------------------------------


def test_torch_names_round_trip_exactly():
  c = model_config('tiny', depth=2, image_size=32, num_classes=10)
  sd = random_timm(9, c)
  model = convert.from_torch(sd, c)
  back = convert.to_torch_state_dict(model)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  p = params_of(model)
  np.testing.assert_array_equal(p['patch_embed.proj.kernel'][2, 5, 1, :],
                                sd['patch_embed.proj.weight'][:, 1, 2, 5])
  np.testing.assert_array_equal(p['blocks.1.attn.qkv.kernel'], sd['blocks.1.attn.qkv.weight'].T)
  np.testing.assert_array_equal(p['norm.scale'], sd['norm.weight'])


def test_orbax_and_safetensors_round_trip(tmp_path):
  c = model_config('tiny', depth=2, image_size=32, num_classes=10)
  sd = random_timm(10, c)
  out = convert.convert_file(save_pth(tmp_path / 'w.pth', sd), c, str(tmp_path / 'ckpt'))
  params, metadata = checkpoints.load_params(out)
  assert metadata['model'] == checkpoints.metadata_json(c)
  assert metadata['source'] == str(tmp_path / 'w.pth')
  assert metadata['source_format'] == 'timm'
  direct = params_of(convert.from_torch(sd, c))
  restored = config_lib.flatten(params)
  assert sorted(restored) == sorted(direct)
  for k in direct:
    np.testing.assert_array_equal(restored[k], direct[k])
  # --to torch, then back again.
  st = convert.export_file(out, str(tmp_path / 'w.safetensors'))
  from safetensors.numpy import load_file
  exported = load_file(st)
  for k in sd:
    np.testing.assert_array_equal(exported[k], sd[k])
  again = params_of(convert.from_torch(st, c))
  for k in direct:
    np.testing.assert_array_equal(again[k], direct[k])
  with pytest.raises(FileExistsError, match='pass --force'):
    convert.export_file(out, st)
  with pytest.raises(FileExistsError, match='pass --force'):
    convert.convert_file(st, c, out)


def test_cli(tmp_path):
  c = model_config('tiny', depth=2, image_size=32, num_classes=10)
  pth = save_pth(tmp_path / 'w.pth', random_timm(11, c))
  ckpt, st = str(tmp_path / 'ckpt'), str(tmp_path / 'w.safetensors')
  overrides = ['--config.model.depth=2', '--config.model.image_size=32',
               '--config.model.num_classes=10', '--config.model.halting=False']
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')

  def run(*args):
    return subprocess.run([sys.executable, '-m', 'avit_jax.convert', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)

  first = run('--src', pth, '--config', 'configs/tiny.py', '--out', ckpt, *overrides)
  assert first.returncode == 0, first.stderr
  # orbax's INFO chatter stays out of the command's output (its warnings would pass).
  assert 'orbax' not in first.stderr
  params, metadata = checkpoints.load_params(ckpt)
  assert metadata['model']['depth'] == 2 and metadata['model']['halting'] is False
  direct = params_of(convert.from_torch(pth, c))
  for k, v in config_lib.flatten(params).items():
    np.testing.assert_array_equal(v, direct[k])
  # Converting onto it again is refused (the command prints this message after "error: "),
  # and leaves it as it was.
  mtime = os.path.getmtime(os.path.join(ckpt, 'params'))
  with pytest.raises(FileExistsError, match=f'^{re.escape(ckpt)} exists and is not empty; '
                     'pass --force'):
    convert.convert_file(pth, c, ckpt)
  assert os.path.getmtime(os.path.join(ckpt, 'params')) == mtime
  back = run('--to', 'torch', '--src', ckpt, '--out', st)
  assert back.returncode == 0, back.stderr
  from safetensors.numpy import load_file
  np.testing.assert_array_equal(load_file(st)['blocks.1.mlp.fc2.weight'],
                                np.asarray(direct['blocks.1.mlp.fc2.kernel']).T)


# --- fine-tuning helpers ----------------------------------------------------------------------


def test_other_num_classes_reinitialises_head(caplog):
  c = model_config('tiny', depth=1, image_size=32, num_classes=10)
  sd = random_timm(12, c, num_classes=1000)
  with caplog.at_level(logging.WARNING):
    model = convert.from_torch(sd, c, seed=3)
  assert 'Checkpoint head classes 1000 -> 10 (config.model.num_classes): re-initialising' \
      in caplog.text
  fresh = params_of(models.create(c, seed=3))
  p = params_of(model)
  np.testing.assert_array_equal(p['head.kernel'], fresh['head.kernel'])
  np.testing.assert_array_equal(p['head.bias'], np.zeros(10))
  np.testing.assert_array_equal(p['norm.scale'], sd['norm.weight'])
  without_head = {k: v for k, v in sd.items() if not k.startswith('head.')}
  np.testing.assert_array_equal(params_of(convert.from_torch(without_head, c, seed=3))
                                ['head.kernel'], fresh['head.kernel'])


@pytest.mark.parametrize('old,new', [(14, 24), (24, 14), (4, 6)])
def test_resample_pos_embed_matches_torch_bicubic(old, new):
  rng = np.random.default_rng(old * new)
  pos = rng.normal(0, 0.1, (1, 1 + old * old, 16)).astype(np.float32)
  ours = convert.resample_pos_embed(pos, new)
  grid = torch.from_numpy(pos[:, 1:].reshape(1, old, old, 16)).permute(0, 3, 1, 2)
  # timm's resample_abs_pos_embed: bicubic, antialias=True, align_corners=False.
  ref = torch.nn.functional.interpolate(grid, size=(new, new), mode='bicubic', antialias=True,
                                        align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(1, new * new, 16).numpy()
  assert ours.shape == (1, 1 + new * new, 16)
  np.testing.assert_array_equal(ours[:, 0], pos[:, 0])
  np.testing.assert_allclose(ours[:, 1:], ref, atol=1e-6)
  np.testing.assert_array_equal(convert.resample_pos_embed(pos, old), pos)


def test_other_image_size_resamples_pos_embed(caplog):
  c = model_config('tiny', depth=1, image_size=48, num_classes=10)
  sd = random_timm(13, c, image_size=32)
  with caplog.at_level(logging.WARNING):
    model = convert.from_torch(sd, c)
  assert 'Resampled pos_embed from a 2x2 to a 3x3 patch grid' in caplog.text
  np.testing.assert_array_equal(params_of(model)['pos_embed'],
                                convert.resample_pos_embed(sd['pos_embed'], 3))
  assert model(images(0, c)).logits.shape == (2, 10)


# --- bad input --------------------------------------------------------------------------------

def test_training_checkpoints_legacy_format_and_bfloat16(tmp_path):
  import argparse
  import fractions
  c = model_config('tiny', depth=1, image_size=32, num_classes=10)
  sd = random_timm(20, c)
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  # A DeiT / A-ViT training checkpoint: weights under 'model' next to options and state.
  train_ckpt = str(tmp_path / 'checkpoint.pth')
  torch.save({'model': tensors, 'args': argparse.Namespace(lr=5e-4), 'epoch': 99,
              'max_accuracy': np.float64(71.4), 'optimizer': {'param_groups': [{'lr': 0.1}]}},
             train_ckpt)
  # The pre-1.6 torch.save format, saved from DistributedDataParallel ('module.' names).
  legacy = str(tmp_path / 'legacy.bin')
  torch.save({'module.' + k: v for k, v in tensors.items()}, legacy,
             _use_new_zipfile_serialization=False)
  for path in (train_ckpt, legacy):
    back = convert.to_torch_state_dict(convert.from_torch(path, c))
    for k in sd:
      np.testing.assert_array_equal(back[k], sd[k])
  # bfloat16 safetensors (numpy has no bfloat16): widened exactly to float32.
  import safetensors.torch
  bf16 = str(tmp_path / 'bf16.safetensors')
  safetensors.torch.save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, bf16)
  back = convert.to_torch_state_dict(convert.from_torch(bf16, c))
  for k in sd:
    np.testing.assert_array_equal(back[k], tensors[k].to(torch.bfloat16).float().numpy())
  unsafe = str(tmp_path / 'unsafe.pth')
  torch.save({'model': tensors, 'note': fractions.Fraction(1, 3)}, unsafe)
  with pytest.raises(ConvertError) as e:
    convert.from_torch(unsafe, c)
  assert str(e.value) == (
      f'{unsafe} holds Python objects besides tensors, which torch.load(weights_only=True) '
      'will not build (it needs fractions.Fraction). If you trust the file, re-save only its '
      "weights: `ckpt = torch.load(path, weights_only=False); torch.save({'model': "
      "ckpt['model']}, 'weights.pth')`")
