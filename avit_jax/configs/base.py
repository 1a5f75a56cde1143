"""A-ViT-B: fine-tune DeiT-B on ImageNet-1K (no published A-ViT-B recipe; reasoned choice).

The paper publishes T and S only. The halting neuron is channel 0 of a block output, whose
scale grows with width: S (384) needed a larger gate centre than T (192) (75 vs 30 at
gamma 10). For B (768) we extrapolate to beta = 100 at gamma 10 so that almost nothing
halts at initialisation and the ponder loss opens halting gradually, take the DeiT-B
fine-tune batch 512 with base lr 2.5e-4 (a lower lr than S, as DeiT-B fine-tunes use),
drop path 0.1, and keep every other constant of the A-ViT recipe.
"""

from avit_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.model = config_lib.model_config('base')
  config.model.gate_scale = 10.0
  config.model.gate_center = 100.0
  config.data.source = 'imagenet2012'
  config.batch_size = 512
  config.num_epochs = 100
  config.optimizer.lr = 2.5e-4
  return config
