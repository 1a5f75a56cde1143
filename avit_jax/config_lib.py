"""Defaults shared by every config file, and start-up validation of a config.

Config files (configs/*.py) start from `base_config()` and change what differs, so every
run has every field and a typo in an override fails loudly.
"""

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
      halting=halting,
      gate_scale=10.0,   # gamma
      gate_center=30.0,  # beta
      eps=0.01,
      dtype='float32',   # compute dtype; parameters stay float32
  ))


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with DeiT-recipe defaults."""
  config = ml_collections.ConfigDict()
  config.mode = 'train'  # 'train' (with periodic eval) or 'eval' (evaluate a checkpoint)
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
      source='imagenet2012',  # 'imagenet2012' (tfds), 'folder', 'fashion_mnist'
      data_dir='',            # tfds data_dir, folder root, or IDX directory
      train_split='train',
      eval_split='validation',
      shuffle_buffer_size=16_384,
      cache=False,
      mean=(0.485, 0.456, 0.406),
      std=(0.229, 0.224, 0.225),
      crop_pct=0.875,
      prefetch=2,
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


SOURCES = ('imagenet2012', 'folder', 'fashion_mnist')
MODES = ('train', 'eval')


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Fails fast, before anything compiles, on impossible values; names field, value, fix."""
  import jax  # local: configs stay importable without jax

  from avit_jax import losses, models

  def fail(field, value, allowed):
    raise ValueError(f'config.{field}={value!r} is invalid: {allowed}')

  _check_types(config, base_config(), fail)
  if config.mode not in MODES:
    fail('mode', config.mode, f'expected one of {MODES}')
  if config.data.source not in SOURCES:
    fail('data.source', config.data.source, f'expected one of {SOURCES}')
  devices = jax.device_count() if device_count is None else device_count
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    if not isinstance(value, int) or value <= 0:
      fail(field, value, 'expected a positive integer')
    if value % devices:
      fail(field, value, f'must be divisible by the number of devices ({devices}); use a '
                         f'multiple of {devices}')
  for field in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    if config[field] <= 0:
      fail(field, config[field], 'expected a positive integer')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    fail('num_epochs', config.num_epochs, 'expected > 0 (or num_train_steps > 0)')
  if config.eval_every_steps < 0:
    fail('eval_every_steps', config.eval_every_steps, 'expected >= 0 (0: once per epoch)')
  models.model_kwargs(config.model)  # architecture checks (patch divides image, heads, dtype)
  if config.model.gate_scale <= 0:
    fail('model.gate_scale', config.model.gate_scale, 'expected > 0')
  if not 0.0 < config.model.eps < 1.0:
    fail('model.eps', config.model.eps, 'expected a value in (0, 1)')
  if not 0.0 <= config.model.drop_path_rate < 1.0:
    fail('model.drop_path_rate', config.model.drop_path_rate, 'expected a value in [0, 1)')
  if config.model.halting:
    losses.prior_target(config.model.depth, config.loss.prior_target_depth, config.loss.prior_std)
  if config.optimizer.lr <= 0:
    fail('optimizer.lr', config.optimizer.lr, 'expected > 0')
  if not 0.0 <= config.optimizer.ema_decay < 1.0:
    fail('optimizer.ema_decay', config.optimizer.ema_decay, 'expected a value in [0, 1)')
  if config.mode == 'train' and config.init_from and not isinstance(config.init_from, str):
    fail('init_from', config.init_from, 'expected a checkpoint directory path')


_TYPE_NAMES = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string',
               tuple: 'a list of values'}


def _check_types(config, reference, fail, prefix: str = '') -> None:
  """Each field has the type of its base_config() default (a config built from a plain
  dict is not type-checked by ConfigDict; an int is accepted where a float is expected)."""
  for key, default in reference.items():
    if key not in config:
      continue
    value, name = config[key], f'{prefix}{key}'
    if isinstance(default, ml_collections.ConfigDict):
      if not hasattr(value, 'items'):
        fail(name, value, 'expected a group of fields')
      _check_types(value, default, fail, name + '.')
      continue
    kind = type(default)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          tuple: lambda v: isinstance(v, (tuple, list))}.get(kind, lambda v: True)
    if not ok(value):
      fail(name, value, f'expected {_TYPE_NAMES[kind]} ({kind.__name__}), got '
                        f'{type(value).__name__}')
