"""A-ViT-T: fine-tune DeiT-T on ImageNet-1K for 100 epochs (published recipe: docs/algorithm.md)."""

from avit_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.model = config_lib.model_config('tiny')
  config.model.gate_scale = 10.0
  config.model.gate_center = 30.0
  config.data.source = 'imagenet2012'
  config.batch_size = 512
  config.num_epochs = 100
  config.optimizer.lr = 5e-4
  return config
