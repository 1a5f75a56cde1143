"""Embedded default: A-ViT on Fashion-MNIST (28x28, patch 7) that trains on 2 CPU cores in minutes.

Patch 7 (a 4x4 grid, 17 tokens) rather than 4 (7x7, 50 tokens): on a few CPU cores a ViT
learns Fashion-MNIST in far less wall time with fewer, wider tokens, at the price of coarse
depth maps.
"""


from avit_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.model.variant = 'avit_fmnist_patch7_28'
  config.model.image_size = 28
  config.model.patch = 7
  config.model.dim = 64
  config.model.depth = 6
  config.model.heads = 4
  config.model.num_classes = 10
  config.model.drop_path_rate = 0.0
  config.model.gate_scale = 10.0
  # Gate centre 3 rather than the ImageNet configs' 10-100: trained from scratch, a score
  # sigmoid(10 * y0 - 10) has a gradient only where channel 0 is already large (bright
  # patches at initialisation), and the model learnt to halt the garment and run the black
  # background. At 3 every token can learn, and the background halts first.
  config.model.gate_center = 3.0

  config.data.source = 'fashion_mnist'
  config.data.data_dir = '/usr/share/datasets/fashion-mnist'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.mean = (0.2860, 0.2860, 0.2860)
  config.data.std = (0.3530, 0.3530, 0.3530)
  config.data.cache = True
  config.data.crop_pct = 1.0  # eval sees the 28x28 image as training does

  # A few epochs do not overfit: no geometric augmentation, RandAugment, erasing or mixup.
  config.aug.random_resized_crop = False
  config.aug.pad_and_crop = 0
  config.aug.hflip = False
  config.aug.randaug = ''
  config.aug.erase_p = 0.0
  config.aug.mixup = 0.0
  config.aug.cutmix = 0.0
  config.aug.label_smoothing = 0.1

  config.loss.ponder_weight = 5e-4
  # A weaker prior than the paper's 1e-3 lets the depths split by content (background near 1
  # layer, garment near 4) instead of bunching at the target depth.
  config.loss.prior_weight = 1e-4
  config.loss.prior_target_depth = 4
  config.loss.prior_std = 1.0

  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 10
  config.optimizer.lr = 8e-3  # x 128/512: peak 2e-3
  config.optimizer.warmup_epochs = 0.2
  config.optimizer.weight_decay = 0.05
  config.log_every_steps = 50
  # Every second epoch (468 steps each): five evaluations of the 10,000 test images instead
  # of ten, in a run meant to take minutes on a CPU.
  config.eval_every_steps = 936
  config.checkpoint_every_steps = 500
  return config
