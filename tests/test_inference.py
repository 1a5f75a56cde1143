"""Inference modes: compact (real token removal) gives the masked model's answers, as one device
program per batch shape; capacity (token budgets) equals masked where it cuts nothing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from avit_jax import config_lib, inference, models
from avit_jax.models import flops
from avit_jax.inference import compact as compact_lib

DEPTH = 4


def small_config(**overrides) -> ml_collections.ConfigDict:
  c = config_lib.model_config('tiny')
  c.update(dict(image_size=32, patch=4, dim=64, depth=DEPTH, heads=4, num_classes=10,
                drop_path_rate=0.1, gate_scale=10.0, gate_center=5.0))
  c.update(overrides)
  return c


def varied_model(seed: int, shift: float = 0.3, spread: float = 20.0, **overrides):
  """Random weights whose halting neuron (channel 0) varies by token: depths spread over 1..L."""
  model = models.create(small_config(**overrides), seed=seed)
  for block in model.blocks:
    block.mlp.fc2.bias[...] = block.mlp.fc2.bias[...].at[0].add(shift)
    block.mlp.fc2.kernel[...] = block.mlp.fc2.kernel[...].at[:, 0].multiply(spread)
  return model


def images(batch: int, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(100 + seed), (batch, 32, 32, 3), jnp.float32)


def assert_same_answers(reference, out):
  np.testing.assert_allclose(out.logits, reference.logits, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(out.token_depth, reference.token_depth)
  np.testing.assert_allclose(out.ponder, reference.ponder, atol=1e-5, rtol=0)


# Batch 1 runs the sequence layout; 3 (sequence_batch 4) too, with images of different
# lengths; 6 and 8 the packed layout in groups of 4 (6: a group padded with empty images; 8:
# two groups, re-sorted by running tokens after every layer); 8 in groups of 2 with fine buckets.
@pytest.mark.parametrize('seed,batch,options', [
    (0, 1, {}), (2, 8, dict(group=4, row_chunk=64)), (5, 6, dict(group=4)),
    pytest.param(1, 3, dict(sequence_batch=4), marks=pytest.mark.slow),
    pytest.param(3, 8, dict(group=2, length_buckets=40), marks=pytest.mark.slow)])
def test_compact_matches_masked(seed, batch, options):
  model = varied_model(seed)
  x = images(batch, seed)
  masked = inference.make_predict_fn(model, 'masked', chunk_size=4)(x)
  compact = inference.make_predict_fn(model, 'compact', chunk_size=4, **options)(x)
  # The halting really varies: several depths, and tokens of one image halt at different layers.
  depths = np.asarray(masked.token_depth)
  assert len(np.unique(depths)) >= 3
  assert (depths.std(axis=1) > 0).all()
  assert_same_answers(masked, compact)
  # Scores of the layers each token ran are the masked model's; later ones are reported as 0.
  ran = np.arange(DEPTH)[None, :, None] < depths[:, None, :]
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
  x = jnp.stack([jnp.ones((32, 32, 3)), -jnp.ones((32, 32, 3)), images(1, 7)[0]])
  masked = inference.make_predict_fn(model, 'masked')(x)
  compact = inference.make_predict_fn(model, 'compact')(x)
  depths = np.asarray(masked.token_depth)
  np.testing.assert_array_equal(depths[0], 1.0)
  assert depths[1, 0] == 1 and (depths[1, 1:] == DEPTH).all()
  assert_same_answers(masked, compact)


def test_no_halting_equals_dense():
  """beta huge: no score crosses before the last layer, so every mode is plain DeiT."""
  model = models.create(small_config(gate_center=1e4), seed=5)
  x = images(4, 1)
  dense = inference.make_predict_fn(model, 'dense')(x)
  for mode in ('masked', 'compact'):
    out = inference.make_predict_fn(model, mode)(x)
    np.testing.assert_allclose(out.logits, dense.logits, atol=1e-4)
    np.testing.assert_array_equal(out.token_depth, DEPTH)
  deit = models.create(small_config(halting=False), seed=5)  # same parameters, no halting
  deit.eval()
  np.testing.assert_allclose(deit(x).logits, dense.logits, atol=1e-5)
  np.testing.assert_array_equal(dense.token_depth, DEPTH)


def test_chunking_does_not_change_answers():
  model = varied_model(4)
  x = images(8, 3)
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
  with pytest.raises(ValueError, match=r"options \['group'\] are for mode 'compact', not 'masked'"):
    inference.make_predict_fn(model, 'masked', group=4)
  deit = models.create(small_config(halting=False), seed=0)
  with pytest.raises(ValueError, match='halting on'):
    inference.make_predict_fn(deit, 'compact')
  with pytest.raises(ValueError, match=r'expected images of shape \[B, 32, 32, 3\]'):
    inference.make_predict_fn(model, 'compact')(jnp.zeros((2, 28, 28, 3)))
  with pytest.raises(ValueError, match='row_chunk must be a positive multiple of 4, got 30'):
    inference.make_predict_fn(model, 'compact', row_chunk=30)


def test_work_counts_what_the_program_computes():
  """work() reports the rows and attention the masked model's halting needs, and what
  compact computes for it: images sorted by running tokens, groups of 4, rounded to the
  buckets."""
  model = varied_model(2)
  x = images(8, 2)
  masked = inference.make_predict_fn(model, 'masked')(x)
  predict = inference.make_predict_fn(model, 'compact', chunk_size=4, group=4, row_chunk=64,
                                      length_buckets=4)
  work = predict.work(masked.token_depth)
  active = np.asarray(flops.active_tokens_per_layer(masked.token_depth, DEPTH))  # [B, L]
  assert sum(work['rows_running']) == active.sum() == np.asarray(masked.token_depth).sum()
  assert sum(work['attention_running']) == (active ** 2).sum()
  # By hand: 65 tokens; MLP rows in steps of 64, then of 16 (a quarter step), so in multiples
  # of 16; attention lengths in multiples of 24 (65 / 4 -> multiple of 8), capped at 65.
  for layer in range(DEPTH):
    counts = np.sort(active[:, layer])[::-1]
    assert work['rows_computed'][layer] == -(-counts.sum() // 16) * 16
    lengths = [min(65, -(-int(g[0]) // 24) * 24) for g in counts.reshape(2, 4) if g[0]]
    assert work['attention_computed'][layer] == sum(4 * n ** 2 for n in lengths)
    assert work['attention_rows_computed'][layer] == sum(4 * n for n in lengths)
  assert_same_answers(masked, predict(x))


def test_larger_groups_at_the_full_length(monkeypatch):
  """Where a group at the full length reaches GROUP_FLOATS, that length's groups hold more
  images than the shorter lengths' (here 3 against 2): same answers, and work() walks the
  sorted images group by group, each group as long as its first image needs."""
  monkeypatch.setattr(compact_lib, 'GROUP_FLOATS', 3 * 65 * 3 * 64)
  model = varied_model(4)
  x = images(8, 4)
  masked = inference.make_predict_fn(model, 'masked')(x)
  predict = inference.make_predict_fn(model, 'compact', chunk_size=4, length_buckets=4)
  plan = predict.plan(8)
  assert plan.lengths == (24, 48, 65) and plan.groups == (2, 2, 3)
  work = predict.work(masked.token_depth)
  active = np.asarray(flops.active_tokens_per_layer(masked.token_depth, DEPTH))
  for layer in range(DEPTH):
    counts, image, rows = np.sort(active[:, layer])[::-1], 0, 0
    while image < 8 and counts[image] > 0:
      length = next(n for n in plan.lengths if n >= counts[image])
      group = plan.groups[plan.lengths.index(length)]
      rows, image = rows + group * length, image + group
    assert work['attention_rows_computed'][layer] == rows
  assert_same_answers(masked, predict(x))


@pytest.mark.parametrize('seed,batch,chunk', [(0, 4, 0), (3, 6, 2)])
def test_capacity_with_calibrated_budget_matches_masked(seed, batch, chunk):
  model = varied_model(seed)
  x = images(batch, seed)
  masked = inference.make_predict_fn(model, 'masked')(x)
  budget = inference.calibrate_capacity(model, x)
  # By hand: the most tokens any image runs at each layer, rounded up to 4 (65 // 16), at
  # most 65.
  active = np.asarray(flops.active_tokens_per_layer(masked.token_depth, DEPTH))
  assert budget == tuple(min(65, -(-int(k) // 4) * 4) for k in active.max(axis=0))
  assert budget[-1] < 65  # the budget really shrinks
  predict = inference.make_predict_fn(model, 'capacity', capacity=budget, chunk_size=chunk)
  out = predict(x)
  assert_same_answers(masked, out)
  np.testing.assert_array_equal(out.tokens_cut, 0)  # never cuts on its calibration images
  ran = np.arange(DEPTH)[None, :, None] < np.asarray(masked.token_depth)[:, None, :]
  np.testing.assert_allclose(out.halting_scores,
                             np.where(ran, masked.halting_scores, 0.0), atol=1e-5)
  predict(x + 0.5)  # one program per batch shape, whatever the halting
  assert predict.compiled_count() == 1


def test_capacity_cuts_tokens_over_budget():
  model = varied_model(2)
  x = images(8, 2)
  masked = inference.make_predict_fn(model, 'masked')(x)
  full = inference.calibrate_capacity(model, x)
  tight = inference.calibrate_capacity(model, x, quantile=0.25, multiple=1)
  assert all(t <= f for t, f in zip(tight, full)) and tight != full
  out = inference.make_predict_fn(model, 'capacity', capacity=tight)(x)
  depth = np.asarray(out.token_depth)
  # No layer runs more tokens of an image than its budget, and some tokens were cut.
  active = np.asarray(flops.active_tokens_per_layer(depth, DEPTH))
  assert (active <= np.asarray(tight)[None, :]).all()
  cut = depth < np.asarray(masked.token_depth)
  assert cut.any()
  np.testing.assert_array_equal(out.tokens_cut, cut.sum(axis=1))  # it says what it cut
  assert np.isfinite(np.asarray(out.logits)).all()
  # A cut token halts as if at the threshold: ponder = depth + remainder, in (depth, depth + 1].
  ponder = np.asarray(out.ponder)
  assert ((ponder[cut] > depth[cut]) & (ponder[cut] <= depth[cut] + 1)).all()
  # The class token always gets a slot: it runs until it halts by itself.
  assert (depth[:, 0] >= 1).all() and (active[:, 0] >= 1).all()


def test_capacity_bad_budgets():
  model = varied_model(0)
  with pytest.raises(ValueError, match=r"mode 'capacity' needs a token budget per layer"):
    inference.make_predict_fn(model, 'capacity')
  with pytest.raises(ValueError, match=r'capacity must be 4 integers in \[1, 65\]'):
    inference.make_predict_fn(model, 'capacity', capacity=(65, 65, 65))
  with pytest.raises(ValueError, match=r'capacity must be 4 integers in \[1, 65\]'):
    inference.make_predict_fn(model, 'capacity', capacity=(65, 66, 8, 8))
  with pytest.raises(ValueError, match=r"capacity is for mode 'capacity', not 'masked'"):
    inference.make_predict_fn(model, 'masked', capacity=(65,) * 4)
  with pytest.raises(ValueError, match=r'quantile must be in \(0, 1\]'):
    inference.calibrate_capacity(model, images(2), quantile=0.0)


@pytest.mark.parametrize('pick', ['compact', 'masked'])
def test_auto_gives_masked_answers_from_either_exact_mode(pick, monkeypatch):
  """auto is the A-ViT whichever exact mode the timing prefers: forced to each, its logits,
  token depths and ponder are masked's, on a model whose tokens halt at varied depths."""
  monkeypatch.setattr(inference, 'faster_exact_mode', lambda seconds: pick)
  model = varied_model(2)
  x = images(8, 2)
  masked = inference.make_predict_fn(model, 'masked', chunk_size=4)(x)
  assert len(np.unique(np.asarray(masked.token_depth))) >= 3
  predict = inference.make_predict_fn(model, 'auto', chunk_size=4, rounds=1)
  first = predict(x)  # times both modes on this batch, then keeps the choice for its shape
  assert predict.modes == {x.shape: pick}
  assert set(predict.seconds[x.shape]) == {'compact', 'masked'}
  assert_same_answers(masked, first)
  assert_same_answers(masked, predict(x))
  assert predict.mode_for(x.shape) == pick


def test_auto_decides_per_batch_shape_from_its_timing(monkeypatch):
  """The faster exact mode by the timing of each batch shape's first call; auto_mode times
  synthetic images of the model's size; new parameters are timed again."""
  seen = []

  def faster(seconds):
    seen.append(dict(seconds))
    return 'compact' if len(seen) % 2 else 'masked'

  monkeypatch.setattr(inference, 'faster_exact_mode', faster)
  model = varied_model(0)
  predict = inference.make_predict_fn(model, 'auto', rounds=1)
  predict(images(2)), predict(images(3)), predict(images(2, 1))
  assert predict.modes == {(2, 32, 32, 3): 'compact', (3, 32, 32, 3): 'masked'}
  assert len(seen) == 2 and all(set(s) == {'compact', 'masked'} and min(s.values()) > 0
                                for s in seen)
  assert predict.mode_for((5, 32, 32, 3)) == 'compact' and len(seen) == 3
  predict.set_params(varied_model(1))
  assert predict.modes == {}
  assert inference.auto_mode(model, 4) == 'masked' and len(seen) == 4
  with pytest.raises(ValueError, match=r'expected images of shape \[B, 32, 32, 3\]'):
    predict.mode_for((2, 16, 16, 3))
  monkeypatch.undo()  # the rule itself: the faster by median seconds per batch
  assert inference.faster_exact_mode({'compact': 1.0, 'masked': 2.0}) == 'compact'
  assert inference.faster_exact_mode({'compact': 2.0, 'masked': 1.0}) == 'masked'


def test_auto_runs_a_model_without_halting_dense():
  deit = models.create(small_config(halting=False), seed=0)
  assert inference.auto_mode(deit, 4) == 'dense'
  x = images(2)
  predict = inference.make_predict_fn(deit, 'auto')
  np.testing.assert_array_equal(predict(x).logits,
                                inference.make_predict_fn(deit, 'dense')(x).logits)
  assert predict.modes == {x.shape: 'dense'} and predict.seconds == {}
