"""A-ViT-S: fine-tune DeiT-S on ImageNet-1K for 100 epochs (published recipe: docs/algorithm.md)."""

from avit_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.model = config_lib.model_config('small')
  config.model.gate_scale = 10.0
  config.model.gate_center = 75.0
  config.data.source = 'imagenet2012'
  config.batch_size = 384
  config.num_epochs = 100
  config.optimizer.lr = 3e-4
  return config
