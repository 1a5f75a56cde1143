"""Inference modes: compact (real token removal) gives the masked model's answers, as one device
program per batch shape; auto gives them too, from the exact mode it timed faster."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avit_jax import inference, models
from tests.helpers import INFERENCE_DEPTH, small_config, small_images, varied_model


def assert_same_answers(reference, out):
  np.testing.assert_allclose(out.logits, reference.logits, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(out.token_depth, reference.token_depth)
  np.testing.assert_allclose(out.ponder, reference.ponder, atol=1e-5, rtol=0)
  if reference.dist_logits is not None:  # a distilled model: its second head too
    np.testing.assert_allclose(out.dist_logits, reference.dist_logits, atol=1e-4, rtol=0)


# Batch 1 runs the sequence layout, larger batches the packed one: at 8 in four groups of 2,
# re-sorted by running tokens after every layer; at 5 with a group padded with an empty
# image. A distilled model's two special tokens both feed a head. 18 images of 257 tokens
# fill whole-length groups of 17 (the second padded), shorter lengths in groups of 2.
@pytest.mark.parametrize('seed,batch,overrides', [
    (2, 8, {}), (3, 1, dict(distilled=True)), (4, 5, dict(distilled=True)),
    pytest.param(1, 18, dict(patch=2), marks=pytest.mark.slow)])
def test_compact_matches_masked(seed, batch, overrides):
  model = varied_model(seed, **overrides)
  x = small_images(batch, seed)
  masked = inference.make_predict_fn(model, 'masked', chunk_size=4)(x)
  predict = inference.make_predict_fn(model, 'compact', chunk_size=4)
  compact = predict(x)
  if batch == 18:
    assert predict.plan(batch).groups == (2,) * 5 + (17,)
  # The halting really varies: several depths, and tokens of one image halt at different layers.
  depths = np.asarray(masked.token_depth)
  assert len(np.unique(depths)) >= 3
  assert (depths.std(axis=1) > 0).all()
  assert_same_answers(masked, compact)
  # Scores of the layers each token ran are the masked model's; later ones are reported as 0.
  ran = np.arange(INFERENCE_DEPTH)[None, :, None] < depths[:, None, :]
  np.testing.assert_allclose(compact.halting_scores,
                             np.where(ran, masked.halting_scores, 0.0), atol=1e-5)
  # Eval mode: the same as the module called directly after model.eval().
  model.eval()
  np.testing.assert_allclose(model(x).logits, masked.logits, atol=1e-5)


def test_one_image_halts_at_once_and_another_never():
  model = varied_model(0, shift=0.0, spread=1.0)
  # Channel 0 of every patch embedding = 100 * the sum of the patch's pixels, so a bright
  # image halts every token at layer 1 and a dark one runs all layers; class tokens halt at
  # layer 1 everywhere, so the dark image's patches run on after its class token stopped.
  kernel = model.patch_embed.proj.kernel[...]
  model.patch_embed.proj.kernel[...] = kernel.at[..., 0].set(100.0)
  model.cls_token[...] = model.cls_token[...].at[..., 0].set(100.0)
  x = jnp.stack([jnp.ones((32, 32, 3)), -jnp.ones((32, 32, 3)), small_images(1, 7)[0]])
  masked = inference.make_predict_fn(model, 'masked')(x)
  compact = inference.make_predict_fn(model, 'compact')(x)
  depths = np.asarray(masked.token_depth)
  np.testing.assert_array_equal(depths[0], 1.0)
  assert depths[1, 0] == 1 and (depths[1, 1:] == INFERENCE_DEPTH).all()
  assert_same_answers(masked, compact)


def test_no_halting_equals_dense():
  """beta huge: no score crosses before the last layer, so every mode is plain DeiT."""
  model = models.create(small_config(gate_center=1e4), seed=5)
  x = small_images(4, 1)
  dense = inference.make_predict_fn(model, 'dense')(x)
  for mode in ('masked', 'compact'):
    out = inference.make_predict_fn(model, mode)(x)
    np.testing.assert_allclose(out.logits, dense.logits, atol=1e-4)
    np.testing.assert_array_equal(out.token_depth, INFERENCE_DEPTH)
  deit = models.create(small_config(halting=False), seed=5)  # same parameters, no halting
  deit.eval()
  np.testing.assert_allclose(deit(x).logits, dense.logits, atol=1e-5)
  np.testing.assert_array_equal(dense.token_depth, INFERENCE_DEPTH)


def test_chunking_does_not_change_answers():
  model = varied_model(4)
  x = small_images(8, 3)
  whole = inference.make_predict_fn(model, 'masked', chunk_size=0)(x)
  chunked = inference.make_predict_fn(model, 'masked', chunk_size=2)(x)
  np.testing.assert_allclose(chunked.logits, whole.logits, atol=1e-5)
  np.testing.assert_array_equal(chunked.token_depth, whole.token_depth)
  np.testing.assert_allclose(chunked.halting_mean, whole.halting_mean, atol=1e-6)
  dense_whole = inference.make_predict_fn(model, 'dense', chunk_size=0)(x)
  dense_chunked = inference.make_predict_fn(model, 'dense', chunk_size=4)(x)
  np.testing.assert_allclose(dense_chunked.logits, dense_whole.logits, atol=1e-5)


@pytest.mark.parametrize('batch', [1, 5])
def test_compact_is_one_program_per_batch_shape_without_host_reads(batch):
  """The whole forward traces under one jax.jit (a read-back of a device value to the host
  cannot be traced), compiles once per batch shape whatever the halting, and takes new
  parameters without compiling again."""
  model = varied_model(6, image_size=16)
  predict = inference.make_predict_fn(model, 'compact', chunk_size=0)
  x = jax.random.normal(jax.random.key(0), (batch, 16, 16, 3))
  outer = jax.jit(lambda images: predict(images))
  jaxpr = jax.make_jaxpr(lambda images: predict(images))(x)
  callbacks = [e for e in _equations(jaxpr.jaxpr) if 'callback' in e.primitive.name]
  assert not callbacks
  assert_same_answers(inference.make_predict_fn(model, 'masked')(x), outer(x))
  for seed in range(3):  # different halting, same shape
    predict(jax.random.normal(jax.random.key(seed), (batch, 16, 16, 3)) * (seed + 1))
  assert predict.compiled_count() == 1
  other = varied_model(7, image_size=16)
  predict.set_params(other)
  assert_same_answers(inference.make_predict_fn(other, 'masked')(x), predict(x))
  assert predict.compiled_count() == 1


def _equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (loops, conditionals, calls) too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          yield from _equations(getattr(inner, 'jaxpr', inner))


def test_static_modes_compile_once_and_take_new_parameters():
  model = varied_model(6, image_size=16)
  x = jax.random.normal(jax.random.key(0), (5, 16, 16, 3))
  masked = inference.make_predict_fn(model, 'masked')
  dense = inference.make_predict_fn(model, 'dense')
  masked(x), dense(x), masked(x + 1.0), dense(x + 1.0)
  assert (masked.compiled_count(), dense.compiled_count()) == (1, 1)
  other = varied_model(7, image_size=16)
  masked.set_params(other)
  expected = inference.make_predict_fn(other, 'masked')(x)
  np.testing.assert_allclose(masked(x).logits, expected.logits, atol=1e-6)
  assert masked.compiled_count() == 1


def test_bad_arguments():
  model = varied_model(0)
  with pytest.raises(ValueError, match='mode must be one of'):
    inference.make_predict_fn(model, 'sparse')
  deit = models.create(small_config(halting=False), seed=0)
  with pytest.raises(ValueError, match='halting on'):
    inference.make_predict_fn(deit, 'compact')
  with pytest.raises(ValueError, match=r'expected images of shape \[B, 32, 32, 3\]'):
    inference.make_predict_fn(model, 'compact')(jnp.zeros((2, 28, 28, 3)))
  with pytest.raises(ValueError, match='same structure'):
    inference.make_predict_fn(model, 'compact').set_params(
        varied_model(0, depth=INFERENCE_DEPTH + 1))


@pytest.mark.parametrize('pick', ['compact', 'masked'])
def test_auto_gives_masked_answers_from_either_exact_mode(pick, monkeypatch):
  """auto is the A-ViT whichever exact mode the timing prefers: forced to each, its logits,
  token depths and ponder are masked's, on a model whose tokens halt at varied depths."""
  monkeypatch.setattr(inference, 'faster_exact_mode', lambda seconds: pick)
  model = varied_model(2)
  x = small_images(8, 2)
  masked = inference.make_predict_fn(model, 'masked', chunk_size=4)(x)
  assert len(np.unique(np.asarray(masked.token_depth))) >= 3
  predict = inference.make_predict_fn(model, 'auto', chunk_size=4)
  first = predict(x)  # times both exact modes on this batch, then keeps the choice
  assert predict.mode == pick and set(predict.seconds) == {'compact', 'masked'}
  assert_same_answers(masked, first)
  assert_same_answers(masked, predict(x))


def test_auto_decides_once_from_its_first_batch(monkeypatch):
  """Timed at the first call only: later batches, of any size, and new parameters keep the
  mode; auto_mode times a batch of random images of the model's size."""
  seen = []

  def faster(seconds):
    seen.append(dict(seconds))
    return 'compact' if len(seen) % 2 else 'masked'

  monkeypatch.setattr(inference, 'faster_exact_mode', faster)
  model = varied_model(0)
  predict = inference.make_predict_fn(model, 'auto')
  predict(small_images(2)), predict(small_images(3)), predict(small_images(2, 1))
  predict.set_params(varied_model(1))
  predict(small_images(2))
  assert predict.mode == 'compact' and len(seen) == 1
  assert set(seen[0]) == {'compact', 'masked'} and min(seen[0].values()) > 0
  assert inference.auto_mode(model, 4) == 'masked' and len(seen) == 2
  monkeypatch.undo()  # the rule itself: the faster by seconds per batch
  assert inference.faster_exact_mode({'compact': 1.0, 'masked': 2.0}) == 'compact'
  assert inference.faster_exact_mode({'compact': 2.0, 'masked': 1.0}) == 'masked'


def test_auto_runs_a_model_without_halting_dense():
  deit = models.create(small_config(halting=False), seed=0)
  assert inference.auto_mode(deit, 4) == 'dense'
  x = small_images(2)
  predict = inference.make_predict_fn(deit, 'auto')
  np.testing.assert_array_equal(predict(x).logits,
                                inference.make_predict_fn(deit, 'dense')(x).logits)
  assert predict.mode == 'dense' and predict.seconds == {}
