"""Start-up check of a whole config, before anything compiles.

Each section is checked once, by the module that uses it; `validate_config` calls them in
this order (it decides which of several mistakes is named first): every field's type
(config_lib), the run mode and lengths (here: what the training loop reads), the data
source (data.sources), the model (models), the losses and distillation numbers (losses) and
the optimizer (optim), and last, as the most costly, the teacher's recorded config against the
student's (`check_teacher`) and the data on disk against the config (`check_data`).
"""

from __future__ import annotations

import jax
import ml_collections

from avit_jax import checkpoints, config_lib, models
from avit_jax.data import sources
from avit_jax.training import losses, optim


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Fails fast, before anything compiles, on impossible values; names field, value, fix.

  device_count: what batch sizes must divide (default: jax.device_count()).
  """
  config_lib.check_types(config)
  if config.mode not in config_lib.RUN_MODES:
    raise config_lib.invalid('mode', config.mode, f'expected one of {config_lib.RUN_MODES}')
  sources.check_config(config.data)
  _check_run_lengths(config, jax.device_count() if device_count is None else device_count)
  models.check_config(config.model)
  if config.model.halting:
    losses.check_prior_target(config.model.depth, config.loss.prior_target_depth)
  losses.check_distill_config(config.distill)
  optim.check_config(config.optimizer)
  check_teacher(config)
  check_data(config)


def check_teacher(config: ml_collections.ConfigDict) -> None:
  """config.distill.teacher, when training with one: a checkpoint whose recorded model takes
  the student's images and predicts its classes, for a student with a distillation head."""
  teacher = config.distill.teacher
  if not teacher or config.mode != 'train':
    return
  if not config.model.distilled:
    raise config_lib.invalid('distill.teacher', teacher, 'a teacher trains the distillation '
                             'head: set --config.model.distilled=True')
  metadata = checkpoints.load_metadata(checkpoints.resolve_checkpoint(teacher))
  recorded = metadata.get('model')
  if not recorded:
    raise config_lib.invalid('distill.teacher', teacher, 'its checkpoint records no model '
                             'config; write it with avit_jax.convert or the trainer')
  want = {f: config.model[f] for f in ('num_classes', 'image_size', 'in_chans')}
  has = {f: recorded.get(f) for f in want}
  if has != want:
    describe = lambda d: ', '.join(f'{k}={v}' for k, v in d.items())
    raise config_lib.invalid(
        'distill.teacher', teacher, f'the teacher has {describe(has)}, the student '
        f'(config.model) {describe(want)}; expected the same classes and images')


def check_data(config: ml_collections.ConfigDict) -> None:
  """The images the pipeline can make for the model, and the data the run reads: its splits
  exist and hold data, and their labels fit model.num_classes.

  A checkpoint's head of another class count is replaced by design (finetune.adapt_params),
  and one of another width is an architecture mismatch that checkpoints.assign_params lists
  before compiling, so config.init_from is not opened here.
  """
  if config.model.in_chans != 3:
    raise config_lib.invalid('model.in_chans', config.model.in_chans,
                             'the input pipeline makes RGB images; expected 3')
  crop_pct, size = config.data.crop_pct, config.model.image_size
  if not 0 < crop_pct <= 1:
    raise config_lib.invalid(
        'data.crop_pct', crop_pct, f'eval resizes the shorter side to floor(model.image_size / '
        f'crop_pct) and crops model.image_size={size} from it; expected a value in (0, 1]')
  fields = ('train_split', 'eval_split') if config.mode == 'train' else ('eval_split',)
  classes = sources.check_data(config, fields)
  if classes is not None and classes > config.model.num_classes:
    raise config_lib.invalid(
        'model.num_classes', config.model.num_classes,
        f'{config.data.source} has {classes} classes (labels 0..{classes - 1}); expected '
        f'at least {classes}')


def _check_run_lengths(config: ml_collections.ConfigDict, devices: int) -> None:
  """The top-level fields of a run: batch sizes, intervals and duration (train.py's loop)."""
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    if not isinstance(value, int) or value <= 0:
      raise config_lib.invalid(field, value, 'expected a positive integer')
    if value % devices:
      raise config_lib.invalid(field, value, f'must be divisible by the number of devices '
                                             f'({devices}); use a multiple of {devices}')
  shards = config.data.shards
  if shards < 0 or (shards and (shards % jax.process_count() or config.batch_size % shards)):
    raise config_lib.invalid('data.shards', shards, f'expected 0 (one per process) or a multiple '
                             f'of the number of processes ({jax.process_count()}) that divides '
                             f'batch_size ({config.batch_size})')
  for field in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    if config[field] <= 0:
      raise config_lib.invalid(field, config[field], 'expected a positive integer')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise config_lib.invalid('num_epochs', config.num_epochs,
                             'expected > 0 (or num_train_steps > 0)')
  if config.eval_every_steps < 0:
    raise config_lib.invalid('eval_every_steps', config.eval_every_steps,
                             'expected >= 0 (0: once per epoch)')
