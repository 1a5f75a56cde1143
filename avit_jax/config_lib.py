"""Defaults shared by every config file, and the generic checks of a config.

Config files (configs/*.py) start from `base_config()` and change what differs, so every
run has every field and a typo in an override fails loudly. Each section of a config is
checked by the module that uses it (`validation.validate_config` calls them in turn); this
module checks only that every field has its default's type. It imports nothing but ml_collections
and the standard library, so configs load without jax or tensorflow.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

# Published DeiT geometries (timm names).
VARIANTS = {
    'tiny': dict(dim=192, depth=12, heads=3),
    'small': dict(dim=384, depth=12, heads=6),
    'base': dict(dim=768, depth=12, heads=12),
}


def model_config(size: str = 'tiny', *, halting: bool = True) -> ml_collections.ConfigDict:
  """Architecture and halting constants of a DeiT / A-ViT at patch 16, 224."""
  geometry = VARIANTS[size]
  prefix = 'avit' if halting else 'deit'
  return ml_collections.ConfigDict(dict(
      variant=f'{prefix}_{size}_patch16_224',
      image_size=224,
      patch=16,
      in_chans=3,
      dim=geometry['dim'],
      depth=geometry['depth'],
      heads=geometry['heads'],
      mlp_ratio=4.0,
      num_classes=1000,
      drop_rate=0.0,
      attn_drop_rate=0.0,
      drop_path_rate=0.1,
      # DeiT's distillation token (after the class token) and its head (timm's dist_token,
      # head_dist): the head a teacher trains (config.distill).
      distilled=False,
      halting=halting,
      gate_scale=10.0,   # gamma
      gate_center=30.0,  # beta
      eps=0.01,
      dtype='float32',   # compute dtype; parameters stay float32
  ))


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with DeiT-recipe defaults."""
  config = ml_collections.ConfigDict()
  config.mode = 'train'  # one of RUN_MODES: 'train' (with periodic eval) or 'eval' (a checkpoint)
  config.seed = 0
  config.batch_size = 512  # global, over all devices and hosts
  config.eval_batch_size = 512
  config.num_epochs = 100
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.num_eval_images = -1  # > 0 evaluates on the first N eval images only
  config.log_every_steps = 100
  config.eval_every_steps = 0  # 0: once per epoch
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.init_from = ''  # orbax checkpoint written by `python -m avit_jax.convert`
  config.eval_checkpoint = ''  # mode='eval': checkpoint dir (default: latest in workdir)
  config.write_depth_maps = True  # figures under WORKDIR/figures at the end of training
  config.skip_nonfinite_steps = False  # False: stop on a non-finite loss; True: skip and count

  config.model = model_config('tiny')

  config.data = ml_collections.ConfigDict(dict(
      source='imagenet2012',  # data.sources.SOURCES: 'imagenet2012' (tfds), 'folder', ...
      data_dir='',            # tfds data_dir, folder root, or IDX directory
      train_split='train',
      eval_split='validation',
      shuffle_buffer_size=16_384,
      cache=False,
      mean=(0.485, 0.456, 0.406),
      std=(0.229, 0.224, 0.225),
      crop_pct=0.875,
      prefetch=2,
      # The train order is defined over this many shards (0: one per process); each process
      # reads shards // processes of them. Fixing it makes a run's batches the same on any
      # number of processes (a pod run replayed on one host).
      shards=0,
  ))

  config.aug = ml_collections.ConfigDict(dict(
      random_resized_crop=True,
      pad_and_crop=0,
      hflip=True,
      randaug='rand-m9-mstd0.5-inc1',
      erase_p=0.25,
      mixup=0.8,
      cutmix=1.0,
      switch_prob=0.5,
      label_smoothing=0.1,
  ))

  config.loss = ml_collections.ConfigDict(dict(
      ponder_weight=5e-4,      # alpha_p
      prior_weight=1e-3,       # alpha_d
      prior_target_depth=8,    # mu
      prior_std=1.0,
  ))

  # Training with a teacher (DeiT): head_dist learns the teacher's predictions, the class
  # head the labels; total = (1 - alpha) * label loss + alpha * distillation loss (+ ponder
  # and prior). Needs model.distilled.
  config.distill = ml_collections.ConfigDict(dict(
      teacher='',     # a checkpoint or training workdir this project loads; '' = no teacher
      kind='hard',    # DISTILL_KINDS: 'hard' (CE with the teacher's argmax) or 'soft' (KL)
      alpha=0.5,
      tau=1.0,        # temperature of 'soft'
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      lr=5e-4,               # base lr at global batch 512; scaled by batch_size / 512
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      warmup_epochs=5.0,
      warmup_lr=1e-6,
      min_lr=1e-5,
      grad_clip_norm=0.0,    # 0: off
      ema_decay=0.0,         # 0: off
  ))

  config.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # -1: all devices
      fsdp=1,
  ))
  return config


# What `config.mode` may be: train (with periodic evaluation) or evaluate a checkpoint.
RUN_MODES = ('train', 'eval')
# How head_dist learns from a teacher: its argmax as a label (DeiT's default) or its softened
# distribution.
DISTILL_KINDS = ('hard', 'soft')


def flatten(tree, prefix: str = '') -> dict[str, Any]:
  """Nested dicts / ConfigDicts -> {'a.b.c': leaf}, keys joined by '.' (list indices as numbers).

  How config fields and parameters are named one by one (diffs, typo hints, checkpoints).
  Anything that is not a mapping (arrays, tuples, None) is a leaf.
  """
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}.{key}' if prefix else str(key)
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      flat.update(flatten(value, name))
    else:
      flat[name] = value
  return flat


def unknown_override(config: ml_collections.ConfigDict, argv: Sequence[str],
                     config_path: str) -> str | None:
  """For the first `--config.<name>=...` of argv that names no field of `config`: an error
  naming it and the nearest valid fields (config_flags names only the name's last part)."""
  valid = sorted(flatten(config))
  for arg in argv:
    if arg.startswith('--config.'):
      name = arg[len('--config.'):].split('=', 1)[0]
      if name not in valid:
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f'; did you mean {", ".join(close)}?' if close else ''
        return (f'unknown config field {name!r}{hint} (valid fields are listed in '
                f'{config_path}; see avit_jax/config_lib.py)')
  return None


class ConfigError(ValueError):
  """A config value that cannot work (raised before anything compiles); the message names
  the field, the value and what is expected."""


def invalid(field: str, value, allowed: str) -> ConfigError:
  """The error for an impossible config value: names the field, the value and what is allowed."""
  return ConfigError(f'config.{field}={value!r} is invalid: {allowed}')


_TYPE_NAMES = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string',
               tuple: 'a list of values'}
_TYPE_CHECKS = {bool: lambda v: isinstance(v, bool),
                int: lambda v: isinstance(v, int) and not isinstance(v, bool),
                float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                str: lambda v: isinstance(v, str),
                tuple: lambda v: isinstance(v, (tuple, list))}


def check_types(config: ml_collections.ConfigDict,
                reference: ml_collections.ConfigDict | None = None, prefix: str = '') -> None:
  """Each field has the type of its base_config() default (a config built from a plain
  dict is not type-checked by ConfigDict; an int is accepted where a float is expected)."""
  reference = base_config() if reference is None else reference
  for key, default in reference.items():
    if key not in config:
      continue
    value, name = config[key], f'{prefix}{key}'
    if isinstance(default, ml_collections.ConfigDict):
      if not hasattr(value, 'items'):
        raise invalid(name, value, 'expected a group of fields')
      check_types(value, default, name + '.')
      continue
    kind = type(default)
    if not _TYPE_CHECKS.get(kind, lambda v: True)(value):
      raise invalid(name, value, f'expected {_TYPE_NAMES[kind]} ({kind.__name__}), got '
                                 f'{type(value).__name__}')
