"""Ready for accelerators without one: the token-removal program and the train step lower with
jax.export for the cuda and tpu platforms (an op that does not exist there fails here), with
no host callback, to outputs of the shapes the model defines."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from avit_jax import inference
from avit_jax.training import losses, optim, train
from configs import fashion_mnist
from tests.helpers import small_images, varied_model

PLATFORMS = ('cuda', 'tpu')


def abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def export(jitted, *args) -> jax.export.Exported:
  """The function exported for PLATFORMS; fails unless it lowers for each of them, and
  unless its module calls back to no host (the markers jax leaves for a host callback)."""
  exported = jax.export.export(jitted, platforms=PLATFORMS)(*abstract(args))
  assert exported.platforms == PLATFORMS
  text = exported.mlir_module()
  assert 'func.func public @main' in text
  assert not any(marker in text for marker in ('callback', 'xla_python', 'host_compute'))
  return exported


@pytest.mark.parametrize('batch', [1, 6])  # the sequence and the packed layout
def test_compact_lowers_for_gpu_and_tpu(batch):
  model = varied_model(0)
  predict = inference.make_predict_fn(model, 'compact', chunk_size=0)
  x = small_images(batch)
  exported = export(predict.jitted, *predict.arguments(x))
  out = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  b, n, depth = batch, model.num_tokens, model.depth
  assert out.logits.shape == (b, model.head.kernel.shape[-1])
  assert out.token_depth.shape == out.ponder.shape == (b, n)
  assert out.halting_scores.shape == (b, depth, n) and out.halting_mean.shape == (depth,)
  assert all(a.dtype == jnp.float32 for a in exported.out_avals)
  # Its inputs are the model's own parameter arrays, each once, and the images.
  params = jax.tree.leaves(nnx.state(model))
  assert len(exported.in_avals) == len(params) + 1
  assert sum(a.size for a in exported.in_avals[:-1]) == sum(p.size for p in params)


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
  exported = export(step, state, batch, None)  # no teacher
  # The new state has the shapes of the old one.
  new_state = jax.tree.unflatten(exported.out_tree, exported.out_avals)[0]
  assert ([a.shape for a in jax.tree.leaves(new_state)]
          == [jnp.shape(a) for a in jax.tree.leaves(state)])
