"""Ready for accelerators without one: the token-removal program, the capacity program and the
train step lower with jax.export for the cuda and tpu platforms (a host callback, or an op
that does not exist there, fails here)."""

import functools

import jax
import jax.numpy as jnp
import pytest

from avit_jax import inference
from avit_jax.training import losses, optim, train
from configs import fashion_mnist
from tests.test_inference import images, varied_model

PLATFORMS = ('cuda', 'tpu')


def abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def lowered_platforms(jitted, *args) -> tuple[str, ...]:
  exported = jax.export.export(jitted, platforms=PLATFORMS)(*abstract(args))
  assert exported.mlir_module_serialized  # a real StableHLO module
  return exported.platforms


@pytest.mark.parametrize('batch', [1, 6])  # the sequence and the packed layout
def test_compact_lowers_for_gpu_and_tpu(batch):
  predict = inference.make_predict_fn(varied_model(0), 'compact', chunk_size=0, group=4,
                                      length_buckets=4, row_chunk=64)
  x = images(batch)
  assert lowered_platforms(predict.jitted, *predict.arguments(x)) == PLATFORMS


def test_capacity_lowers_for_gpu_and_tpu():
  model = varied_model(0)
  x = images(4)
  predict = inference.make_predict_fn(model, 'capacity', chunk_size=0,
                                      capacity=inference.calibrate_capacity(model, x))
  assert lowered_platforms(predict.jitted, *predict.arguments(x)) == PLATFORMS


def test_train_step_lowers_for_gpu_and_tpu():
  config = fashion_mnist.get_config()
  config.model.dim, config.model.heads = 32, 2
  model = train.create_model(config)
  graphs, params = train.split_model(model)
  schedule = optim.schedule(config.optimizer, config.batch_size, 100, 10)
  tx = optim.make_optimizer(config.optimizer, schedule)
  state = train.create_train_state(params, tx, ema=True)
  prior = losses.prior_target(config.model.depth, config.loss.prior_target_depth,
                              config.loss.prior_std)
  step = jax.jit(functools.partial(train.train_step, graphs=graphs, tx=tx, lr_schedule=schedule,
                                   config=config, prior_target=prior))
  size = config.model.image_size
  batch = {'images': jnp.zeros((8, size, size, 3), jnp.float32),
           'labels': jnp.zeros((8,), jnp.int32)}
  assert lowered_platforms(step, state, batch) == PLATFORMS
