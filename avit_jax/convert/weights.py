"""PyTorch / timm / Hugging Face ViT weights <-> avit_jax parameters, via one name table.

Sources: DeiT / A-ViT `.pth` ({'model': state_dict}), timm state dicts (`.pth`, `.bin`,
`model.safetensors`) and Hugging Face ViT / DeiT checkpoints (renamed to timm names first,
q/k/v fused), distilled DeiT included (timm's dist_token and head_dist; Hugging Face's
distillation_token and distillation_classifier). A-ViT adds no parameters: its halting
neuron is channel 0 of each block output, and the gate scale / centre come from
config.model. The renamed arrays then go through the fine-tuning rules of
checkpoints/finetune.py, as `config.init_from` does: a head of another size is
re-initialised, a distillation token the model lacks is dropped (or one it has and the
weights lack is initialised), and the position embedding is resampled when the image size
differs.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Mapping

import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from avit_jax import checkpoints, config_lib, models
from avit_jax.checkpoints import finetune
from avit_jax.checkpoints.finetune import resample_pos_embed
from avit_jax.convert.torch_io import (ConvertError, read_state_dict, unwrap_state_dict,
                                       write_safetensors)

__all__ = ['ConvertError', 'from_torch', 'to_torch_state_dict', 'torch_to_params',
           'hf_to_timm', 'resample_pos_embed', 'convert_file', 'export_file']

# timm name (torch layout) -> avit_jax name, and how the array changes on the way.
# 'same': copied; 'linear': torch [out, in] -> kernel [in, out];
# 'conv': torch [D, C, p, p] (OIHW) -> kernel [p, p, C, D] (HWIO).
TIMM_TABLE = (
    ('cls_token', 'cls_token', 'same'),
    ('dist_token', 'dist_token', 'same'),
    ('pos_embed', 'pos_embed', 'same'),
    ('patch_embed.proj.weight', 'patch_embed.proj.kernel', 'conv'),
    ('patch_embed.proj.bias', 'patch_embed.proj.bias', 'same'),
    ('blocks.{i}.norm1.weight', 'blocks.{i}.norm1.scale', 'same'),
    ('blocks.{i}.norm1.bias', 'blocks.{i}.norm1.bias', 'same'),
    ('blocks.{i}.attn.qkv.weight', 'blocks.{i}.attn.qkv.kernel', 'linear'),
    ('blocks.{i}.attn.qkv.bias', 'blocks.{i}.attn.qkv.bias', 'same'),
    ('blocks.{i}.attn.proj.weight', 'blocks.{i}.attn.proj.kernel', 'linear'),
    ('blocks.{i}.attn.proj.bias', 'blocks.{i}.attn.proj.bias', 'same'),
    ('blocks.{i}.norm2.weight', 'blocks.{i}.norm2.scale', 'same'),
    ('blocks.{i}.norm2.bias', 'blocks.{i}.norm2.bias', 'same'),
    ('blocks.{i}.mlp.fc1.weight', 'blocks.{i}.mlp.fc1.kernel', 'linear'),
    ('blocks.{i}.mlp.fc1.bias', 'blocks.{i}.mlp.fc1.bias', 'same'),
    ('blocks.{i}.mlp.fc2.weight', 'blocks.{i}.mlp.fc2.kernel', 'linear'),
    ('blocks.{i}.mlp.fc2.bias', 'blocks.{i}.mlp.fc2.bias', 'same'),
    ('norm.weight', 'norm.scale', 'same'),
    ('norm.bias', 'norm.bias', 'same'),
    ('head.weight', 'head.kernel', 'linear'),
    ('head.bias', 'head.bias', 'same'),
    ('head_dist.weight', 'head_dist.kernel', 'linear'),
    ('head_dist.bias', 'head_dist.bias', 'same'),
)
_TO_JAX = {'same': lambda a: a, 'linear': lambda a: a.T,
           'conv': lambda a: a.transpose(2, 3, 1, 0)}
_TO_TORCH = {'same': lambda a: a, 'linear': lambda a: a.T,
             'conv': lambda a: a.transpose(3, 2, 0, 1)}

# Hugging Face name (after an optional 'vit.' / 'deit.' prefix) -> timm name. Both the
# on-disk names of hub checkpoints (transformers 4) and transformers 5 module names.
# q/k/v go to temporary names and are fused into attn.qkv in that order (timm's layout).
HF_TABLE = (
    ('embeddings.cls_token', 'cls_token'),
    ('embeddings.position_embeddings', 'pos_embed'),
    ('embeddings.distillation_token', 'dist_token'),
    ('embeddings.patch_embeddings.projection.{p}', 'patch_embed.proj.{p}'),
    ('encoder.layer.{i}.layernorm_before.{p}', 'blocks.{i}.norm1.{p}'),
    ('encoder.layer.{i}.attention.attention.query.{p}', 'blocks.{i}.attn.q.{p}'),
    ('encoder.layer.{i}.attention.attention.key.{p}', 'blocks.{i}.attn.k.{p}'),
    ('encoder.layer.{i}.attention.attention.value.{p}', 'blocks.{i}.attn.v.{p}'),
    ('encoder.layer.{i}.attention.output.dense.{p}', 'blocks.{i}.attn.proj.{p}'),
    ('encoder.layer.{i}.layernorm_after.{p}', 'blocks.{i}.norm2.{p}'),
    ('encoder.layer.{i}.intermediate.dense.{p}', 'blocks.{i}.mlp.fc1.{p}'),
    ('encoder.layer.{i}.output.dense.{p}', 'blocks.{i}.mlp.fc2.{p}'),
    ('layers.{i}.layernorm_before.{p}', 'blocks.{i}.norm1.{p}'),
    ('layers.{i}.attention.q_proj.{p}', 'blocks.{i}.attn.q.{p}'),
    ('layers.{i}.attention.k_proj.{p}', 'blocks.{i}.attn.k.{p}'),
    ('layers.{i}.attention.v_proj.{p}', 'blocks.{i}.attn.v.{p}'),
    ('layers.{i}.attention.o_proj.{p}', 'blocks.{i}.attn.proj.{p}'),
    ('layers.{i}.layernorm_after.{p}', 'blocks.{i}.norm2.{p}'),
    ('layers.{i}.mlp.fc1.{p}', 'blocks.{i}.mlp.fc1.{p}'),
    ('layers.{i}.mlp.fc2.{p}', 'blocks.{i}.mlp.fc2.{p}'),
    ('layernorm.{p}', 'norm.{p}'),
    ('classifier.{p}', 'head.{p}'),
    ('cls_classifier.{p}', 'head.{p}'),
    ('distillation_classifier.{p}', 'head_dist.{p}'),
)
# HF modules DeiT / A-ViT do not have and that do not affect the logits.
_HF_UNUSED = re.compile(r'pooler\.dense\.(weight|bias)')


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
  escaped = re.escape(template).replace(r'\{i\}', r'(?P<i>\d+)').replace(r'\{p\}',
                                                                          r'(?P<p>weight|bias)')
  return re.compile(escaped)


def _rename(name: str, table, src: int, dst: int):
  """(new name, row) for the first row whose column `src` matches `name`, else None."""
  for row in table:
    match = _pattern(row[src]).fullmatch(name)
    if match:
      return row[dst].format(**match.groupdict()), row
  return None


def hf_to_timm(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict, list[str]]:
  """Hugging Face ViT names -> timm names (q/k/v fused into qkv).

  Returns (timm state dict, {timm name: HF name(s)}, HF names that match no rule).
  """
  out, origin, unknown, parts = {}, {}, [], {}
  for name, value in state_dict.items():
    short = re.sub(r'^(vit|deit)\.', '', name)
    if _HF_UNUSED.fullmatch(short):
      logging.info('Ignoring %s: not part of DeiT / A-ViT (the head reads the class token).',
                   name)
      continue
    renamed = _rename(short, HF_TABLE, 0, 1)
    if renamed is None:
      unknown.append(name)
      continue
    timm_name = renamed[0]
    fused = re.fullmatch(r'blocks\.(\d+)\.attn\.([qkv])\.(weight|bias)', timm_name)
    if fused:
      i, which, leaf = fused.groups()
      parts.setdefault(f'blocks.{i}.attn.qkv.{leaf}', {})[which] = (name, value)
      continue
    out[timm_name], origin[timm_name] = value, name
  for timm_name, got in parts.items():
    if set(got) != {'q', 'k', 'v'}:
      names = ', '.join(n for n, _ in got.values())
      raise ConvertError(f'{timm_name}: found only {names}; query, key and value are all '
                         'needed to build the fused qkv projection')
    out[timm_name] = np.concatenate([got[w][1] for w in 'qkv'], axis=0)
    origin[timm_name] = re.sub(r'(query|q_proj)', '{q,k,v}', got['q'][0])
  return out, origin, unknown


def _is_hf(names) -> bool:
  return any(re.match(r'(vit\.|deit\.)?(embeddings|encoder\.layer|layers)\.', n) for n in names)


def _translate(flat: Mapping[str, np.ndarray], *, to_torch: bool) -> tuple[dict, dict]:
  """Flat avit_jax names <-> timm names in torch layouts, by TIMM_TABLE. Returns (translated,
  {name: array} of the names the table does not know, untouched)."""
  src, dst, transforms = (1, 0, _TO_TORCH) if to_torch else (0, 1, _TO_JAX)
  out, unknown = {}, {}
  for name, value in flat.items():
    renamed = _rename(name, TIMM_TABLE, src, dst)
    if renamed is None:
      unknown[name] = value
      continue
    new_name, row = renamed
    out[new_name] = transforms[row[2]](np.asarray(value))
  return out, unknown


def to_torch_state_dict(model_or_params: nnx.Module | Mapping) -> dict[str, np.ndarray]:
  """avit_jax model (or its nested param dict) -> timm-named arrays in torch layouts."""
  params = (model_or_params if isinstance(model_or_params, Mapping)
            else nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param)))
  out, unknown = _translate(config_lib.flatten(params), to_torch=True)
  if unknown:
    raise ConvertError(f'parameters with no timm name: {", ".join(sorted(unknown))}')
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def torch_to_params(state_dict: Mapping[str, np.ndarray], template: Mapping,
                    model_config: ml_collections.ConfigDict,
                    what: str = 'checkpoint') -> tuple[dict, dict]:
  """timm / HF names -> params nested like `template` (the model's pure param dict).

  The fine-tuning rules (finetune.adapt_params) run on the renamed arrays: a head for another
  class count comes from the template, pos_embed is resampled. Returns (params, info) with
  info describing the source format and what was adapted. A misfit is reported in timm
  names and torch layouts, as the file has them.
  """
  source = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  info = {'source_format': 'timm'}
  origin, unknown_src = {}, []
  if _is_hf(source):
    source, origin, unknown_src = hf_to_timm(source)
    info['source_format'] = 'huggingface'
  native, untranslated = _translate(source, to_torch=False)
  expected = config_lib.flatten(template)
  native, changes = finetune.adapt_params(native, expected, model_config)
  info.update(changes)
  # The check runs on what will be loaded; the message speaks the file's names and layouts.
  found_torch, _ = _translate(native, to_torch=True)
  expected_torch, _ = _translate(expected, to_torch=True)
  c = model_config
  message = checkpoints.misfit_message(
      f'{what} does not fit config.model (dim={c.dim}, depth={c.depth}, heads={c.heads}, '
      f'patch={c.patch}, image_size={c.image_size}, num_classes={c.num_classes}); names and '
      'shapes in timm / torch layout:', expected_torch, {**found_torch, **untranslated},
      label=lambda k: f'{k} (file: {origin[k]})' if origin.get(k, k) != k else k,
      unknown_names=unknown_src, original=source)
  if message:
    raise ConvertError(message)
  return checkpoints.nest_like(dict(template), native), info


def _load_into(src, model_config, seed: int):
  if isinstance(src, (str, os.PathLike)):
    what = os.fspath(src)
    state_dict = read_state_dict(what)
  else:  # also accepts torch tensors and a training checkpoint dict {'model': ...}
    what = 'state dict'
    state_dict = unwrap_state_dict(src, what)
  # The template's values matter: a head of another class count is this model's fresh one.
  model = models.create(model_config, seed=seed)
  template = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params, info = torch_to_params(state_dict, template, model_config, what)
  checkpoints.assign_params(model, params, what)
  return model, params, info


def from_torch(src: str | os.PathLike | Mapping[str, np.ndarray],
               model_config: ml_collections.ConfigDict, *, seed: int = 0) -> models.AViT:
  """PyTorch weights -> `AViT` built from `model_config`.

  src: a .pth / .bin / .safetensors file, a Hugging Face model directory, or a mapping of
  timm or HF names to arrays in torch layout. A re-initialised head uses `seed`.
  The model comes back in eval mode (dropout, drop-path off); `model.train()` to fine-tune.
  """
  return _load_into(src, model_config, seed)[0]


def convert_file(src: str, model_config: ml_collections.ConfigDict, out: str, *,
                 force: bool = False, seed: int = 0) -> str:
  """Writes an orbax parameter checkpoint (checkpoints.save_params) from a PyTorch file."""
  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out) and not force:  # fail before the slow part
    raise FileExistsError(f'{out} exists and is not empty; pass --force to replace it or '
                          'choose another --out directory')
  _, params, info = _load_into(src, model_config, seed)
  metadata = {'model': checkpoints.metadata_json(model_config),
              'source': os.path.abspath(src), 'converted_by': 'avit_jax.convert', **info}
  return checkpoints.save_params(out, params, metadata, force=force)


def export_file(src: str, out: str, *, force: bool = False) -> str:
  """avit_jax checkpoint directory -> timm-named .safetensors (torch layouts, numpy only)."""
  params, metadata = checkpoints.load_params(src)
  meta = {'format': 'pt', 'source': os.path.abspath(src), 'converted_by': 'avit_jax.convert'}
  if 'model' in metadata:
    meta['avit_jax_model'] = metadata['model']
  return write_safetensors(out, to_torch_state_dict(params), meta, force=force)
