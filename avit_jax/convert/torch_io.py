"""Reading and writing PyTorch-side weight files as flat dicts of numpy arrays.

Reads `.safetensors` with numpy only; `.pth` / `.pt` / `.bin` (torch.save archives) need
PyTorch (`pip install -e .[torch]`) and are loaded with `torch.load(weights_only=True)`, so
no code inside a checkpoint ever runs. Knows nothing about parameter names.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
from typing import Mapping

import numpy as np

from avit_jax.checkpoints import CheckpointError

# Files a Hugging Face model directory holds, in the order they are preferred.
HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
# Entries of a training checkpoint dict that hold the weights (DeiT, A-ViT: 'model').
STATE_DICT_ENTRIES = ('model', 'state_dict', 'model_state_dict')

_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
                       'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8,
                       'U8': np.uint8, 'BOOL': np.bool_}


class ConvertError(CheckpointError):
  """A weight file that cannot be read or does not fit the model."""


def _sniff(path: str) -> str:
  """'zip' | 'pickle' | 'safetensors' from the first bytes of the file, else raises."""
  with open(path, 'rb') as f:
    head = f.read(16)
  if not head:
    raise ConvertError(f'{path} is empty: expected a PyTorch (.pth/.bin) or .safetensors '
                       'checkpoint')
  if head.startswith(b'PK\x03\x04'):  # torch.save's zip archive (torch >= 1.6)
    return 'zip'
  if head[0] == 0x80:  # a pickle protocol byte: the legacy torch.save format
    return 'pickle'
  if len(head) >= 9 and head[8:9] == b'{':  # 8-byte header length, then a JSON header
    return 'safetensors'
  raise ConvertError(f'{path} is not a checkpoint: expected a PyTorch file (.pth/.bin, a zip '
                     f'archive written by torch.save) or a .safetensors file, but it starts '
                     f'with {head[:8]!r}')


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Numpy-only reader (also bfloat16, which numpy lacks: widened to float32 exactly)."""
  try:
    import safetensors  # pylint: disable=import-outside-toplevel
    with open(path, 'rb') as f:
      data = f.read()
    (header_len,) = struct.unpack('<Q', data[:8])
    if 8 + header_len > len(data):
      raise ValueError(f'header of {header_len} bytes but the file has {len(data)}')
    views = safetensors.deserialize(data)
  except Exception as e:  # the reader's errors say little about what is wrong with the file
    raise ConvertError(f'{path} is not a readable .safetensors file: it is truncated or not a '
                       f'checkpoint ({type(e).__name__}: {e})') from None
  out = {}
  for name, view in views:
    dtype, shape, raw = view['dtype'], view['shape'], view['data']
    if dtype == 'BF16':
      bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
      out[name] = bits.view(np.float32).reshape(shape)
    elif dtype in _SAFETENSORS_DTYPES:
      out[name] = np.frombuffer(raw, _SAFETENSORS_DTYPES[dtype]).reshape(shape).copy()
    else:
      raise ConvertError(f'{path}: tensor {name} has dtype {dtype}, which cannot be converted')
  return out


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConvertError(f'reading {path} needs PyTorch, which is not installed: run '
                       '`pip install -e .[torch]` (or convert the file to .safetensors, which '
                       'needs only numpy)') from None
  return torch


def _safe_globals() -> list:
  """Harmless classes training checkpoints hold besides tensors: argparse options (DeiT,
  A-ViT) and numpy scalars (best accuracy, etc.). Nothing that could run code."""
  try:
    from numpy._core.multiarray import scalar  # pylint: disable=import-outside-toplevel
  except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar  # pylint: disable=import-outside-toplevel
  dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
  return [argparse.Namespace, scalar, np.dtype, *dtypes]


def _read_torch(path: str) -> Mapping:
  torch = _import_torch(path)
  try:
    with torch.serialization.safe_globals(_safe_globals()):
      return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pickle / zip errors: turn them into a statement about the file
    text = str(e).strip()
    if 'Weights only load failed' in text:
      found = re.search(r'Unsupported global: GLOBAL (\S+)', text)
      what = f'it needs {found.group(1)}' if found else text.splitlines()[0]
      raise ConvertError(
          f'{path} holds Python objects besides tensors, which torch.load(weights_only=True) '
          f'will not build ({what}). If you trust the file, re-save only its weights: '
          "`ckpt = torch.load(path, weights_only=False); torch.save({'model': ckpt['model']}, "
          "'weights.pth')`") from None
    message = text.splitlines()[0] if text else ''
    raise ConvertError(f'{path} could not be read as a PyTorch checkpoint: it is truncated or '
                       f'not a checkpoint ({type(e).__name__}: {message})') from None


def _to_numpy(value) -> np.ndarray:
  if not hasattr(value, 'detach'):  # numpy / jax arrays
    return np.asarray(value)
  import torch  # pylint: disable=import-outside-toplevel
  value = value.detach().cpu()
  if value.dtype in (torch.float16, torch.bfloat16):
    value = value.float()  # exact: both widen to float32 without rounding
  return value.numpy()


def unwrap_state_dict(obj, path: str) -> dict[str, np.ndarray]:
  """Training checkpoint dict -> its state dict; tensors -> numpy; drops a DDP `module.`."""
  if not isinstance(obj, Mapping):
    raise ConvertError(f'{path} holds a {type(obj).__name__}, not a state dict (a mapping of '
                       'parameter names to tensors)')
  for entry in STATE_DICT_ENTRIES:
    if isinstance(obj.get(entry), Mapping):
      obj = obj[entry]
      break
  tensors = {k: v for k, v in obj.items() if hasattr(v, 'shape')}
  if not tensors:
    raise ConvertError(f'{path} holds no tensors: expected a state dict or a dict with one of '
                       f'the entries {list(STATE_DICT_ENTRIES)}; its keys are '
                       f'{sorted(map(str, obj))[:20]}')
  arrays = {k: _to_numpy(v) for k, v in tensors.items()}
  if all(k.startswith('module.') for k in arrays):  # saved from DistributedDataParallel
    arrays = {k[len('module.'):]: v for k, v in arrays.items()}
  return arrays


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Flat {name: array} from a .pth/.bin/.safetensors file or a Hugging Face model directory."""
  if os.path.isdir(path):
    if os.path.isdir(os.path.join(path, 'params')):
      raise ConvertError(f'{path} is already an avit_jax checkpoint; to write it for PyTorch '
                         'use `--to torch --src DIR --out FILE.safetensors`')
    found = [os.path.join(path, f) for f in HF_WEIGHT_FILES
             if os.path.isfile(os.path.join(path, f))]
    if not found:
      raise ConvertError(f'{path} is a directory without {" or ".join(HF_WEIGHT_FILES)}: pass '
                         'the weight file itself with --src')
    path = found[0]
  if not os.path.isfile(path):
    raise ConvertError(f'{path} does not exist: pass a .pth, .bin or .safetensors file')
  kind = _sniff(path)
  if kind == 'safetensors':
    return unwrap_state_dict(_read_safetensors(path), path)
  return unwrap_state_dict(_read_torch(path), path)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: dict[str, str],
                      *, force: bool = False) -> str:
  """Writes contiguous float32 tensors with numpy only; refuses to overwrite unless `force`."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  path = os.path.abspath(path)
  if not path.endswith('.safetensors'):
    raise ConvertError(f'--out {path} must end in .safetensors (the numpy-only format that '
                       'torch and timm load with safetensors.torch.load_file)')
  if os.path.exists(path) and not force:
    raise FileExistsError(f'{path} exists; pass --force to replace it or choose another --out')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
  tmp = path + '.tmp'
  save_file(arrays, tmp, metadata=metadata)
  os.replace(tmp, path)  # never leaves a half-written file under the final name
  return path
