"""Conversion refuses bad input with messages that list what is wrong (names, shapes, files)."""

import re
import sys

import numpy as np
import pytest

from avit_jax import convert
from avit_jax.convert.torch_io import ConvertError
from configs import fashion_mnist
from tests.helpers import model_config, params_of, random_timm, save_pth, timm_to_hf


SMALL = dict(depth=2, image_size=32, num_classes=10)
HEADER = ('state dict does not fit config.model (dim=192, depth=2, heads=3, patch=16, '
          'image_size=32, num_classes=10); names and shapes in timm / torch layout:\n')


def test_unknown_missing_and_mismatched_names_are_listed():
  c = model_config('tiny', **SMALL)
  sd = random_timm(14, c)
  sd['blocks.0.attn.extra.weight'] = np.zeros((4, 4), np.float32)
  del sd['blocks.1.norm2.bias']
  sd['blocks.0.mlp.fc1.weight'] = np.zeros((384, 192), np.float32)
  with pytest.raises(ConvertError) as e:
    convert.from_torch(sd, c)
  assert str(e.value) == HEADER + (
      '  shape mismatches: blocks.0.mlp.fc1.weight: model (768, 192) vs checkpoint (384, 192)\n'
      '  missing from the checkpoint: blocks.1.norm2.bias (192,)\n'
      '  not in the model: blocks.0.attn.extra.weight (4, 4)')


def test_depth_mismatch_gives_a_hint():
  c = model_config('tiny', **SMALL)
  sd = random_timm(15, c, depth=3)
  with pytest.raises(ConvertError) as e:
    convert.from_torch(sd, c)
  message = str(e.value)
  assert '  not in the model: blocks.2.attn.proj.bias (192,), blocks.2.attn.proj.weight ' \
         '(192, 192),' in message
  assert message.endswith('  hint: the checkpoint has depth 3 and width 192; choose the '
                          'matching config or override, e.g. --config.model.depth=3 '
                          '--config.model.dim=192')


def test_another_geometry_gives_a_short_message_whose_hint_fits():
  """DeiT-T-shaped weights against the Fashion-MNIST config: the first few names of each
  kind, counted beyond, and a hint whose overrides make the same weights convert."""
  sd = random_timm(17, model_config('tiny', **SMALL))  # width 192, depth 2, patch 16, 32 px
  target = fashion_mnist.get_config().model             # width 64, depth 6, patch 7, 28 px
  with pytest.raises(ConvertError) as e:
    convert.from_torch(sd, target)
  lines = str(e.value).splitlines()
  assert len(lines) == 4 and len(str(e.value)) < 1500
  assert lines[1].startswith('  shape mismatches: ') and lines[1].endswith(' more')
  assert lines[2].startswith('  missing from the checkpoint: blocks.2.attn.proj.bias (64,), ')
  flags = dict(re.findall(r'--config\.model\.(\w+)=(\S+)', lines[-1]))
  assert flags == {'depth': '2', 'dim': '192', 'patch': '16', 'image_size': '32', 'heads': '3'}
  for name, value in flags.items():
    target[name] = int(value)
  model = convert.from_torch(sd, target)
  np.testing.assert_array_equal(params_of(model)['patch_embed.proj.kernel'],
                                sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0))


def test_hf_mismatch_names_the_file_entry():
  c = model_config('tiny', **SMALL)
  hf = timm_to_hf(random_timm(16, c), old_names=True)
  hf['vit.encoder.layer.0.attention.attention.key.weight'] = np.zeros((96, 192), np.float32)
  with pytest.raises(ConvertError) as e:
    convert.from_torch(hf, c)
  assert str(e.value) == HEADER + (
      '  shape mismatches: blocks.0.attn.qkv.weight (file: '
      'vit.encoder.layer.0.attention.attention.{q,k,v}.weight): model (576, 192) vs checkpoint '
      '(480, 192)')


def test_distilled_deit_into_a_plain_model_drops_the_distillation_token():
  c = model_config('tiny', **SMALL)
  plain = random_timm(17, c)
  distilled = dict(plain)
  distilled['dist_token'] = np.full((1, 1, 192), 0.5, np.float32)
  distilled['head_dist.weight'] = 2 * plain['head.weight']
  distilled['head_dist.bias'] = 2 * plain['head.bias']
  distilled['pos_embed'] = np.insert(plain['pos_embed'], 1, 0.25, axis=1)
  got, want = params_of(convert.from_torch(distilled, c)), params_of(convert.from_torch(plain, c))
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_not_a_checkpoint(tmp_path):
  c = model_config('tiny', **SMALL)
  path = tmp_path / 'notes.pth'
  path.write_text('hello, not weights')
  with pytest.raises(ConvertError) as e:
    convert.from_torch(str(path), c)
  assert str(e.value) == (f'{path} is not a checkpoint: expected a PyTorch file (.pth/.bin, a '
                          'zip archive written by torch.save) or a .safetensors file, but it '
                          "starts with b'hello, n'")
  with pytest.raises(ConvertError, match='does not exist'):
    convert.from_torch(str(tmp_path / 'missing.pth'), c)


def test_truncated_files(tmp_path):
  c = model_config('tiny', **SMALL)
  sd = random_timm(18, c)
  pth = save_pth(tmp_path / 'w.pth', sd)
  from safetensors.numpy import save_file
  st = str(tmp_path / 'w.safetensors')
  save_file(sd, st)
  for path in (pth, st):
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
      f.write(data[:len(data) // 2])
  with pytest.raises(ConvertError, match=f'^{pth} could not be read as a PyTorch checkpoint: '
                     r'it is truncated or not a checkpoint \(RuntimeError: '):
    convert.from_torch(pth, c)
  with pytest.raises(ConvertError, match=f'^{st} is not a readable .safetensors file: it is '
                     'truncated or not a checkpoint'):
    convert.from_torch(st, c)


def test_pth_without_torch_says_how_to_install(tmp_path, monkeypatch):
  c = model_config('tiny', **SMALL)
  sd = random_timm(19, c)
  pth = save_pth(tmp_path / 'w.pth', sd)
  from safetensors.numpy import save_file
  st = str(tmp_path / 'w.safetensors')
  save_file(sd, st)
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
  with pytest.raises(ConvertError) as e:
    convert.from_torch(pth, c)
  assert str(e.value) == (f'reading {pth} needs PyTorch, which is not installed: run `pip '
                          'install -e .[torch]` (or convert the file to .safetensors, which '
                          'needs only numpy)')
  model = convert.from_torch(st, c)  # numpy only
  np.testing.assert_array_equal(params_of(model)['head.bias'], sd['head.bias'])


# --- file formats -----------------------------------------------------------------------------
