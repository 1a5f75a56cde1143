"""DeiT backbone and A-ViT halting: shapes, invariants of docs/algorithm.md "Halting", compile counts."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from avit_jax import config_lib, models
from avit_jax.models import halting as halting_lib
from avit_jax.models.vit import Block, gelu


def small_config(**overrides) -> ml_collections.ConfigDict:
  c = config_lib.model_config('tiny')
  c.update(dict(image_size=16, patch=4, dim=32, depth=4, heads=4, num_classes=7,
                drop_path_rate=0.0, gate_scale=10.0, gate_center=5.0))
  c.update(overrides)
  return c


def images(batch=3, size=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


def lift_halting_neuron(model, shift):
  """Adds `shift` to channel 0 of every block's output so that tokens halt early."""
  for block in model.blocks:
    block.mlp.fc2.bias[...] = block.mlp.fc2.bias[...].at[0].add(shift)


class ModelTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_dtypes_and_jit_agree(self):
    model = models.create(small_config(), seed=0)
    x = images()
    graphdef, state = nnx.split(model)

    def forward(state, x):
      return nnx.merge(graphdef, state)(x)

    out = self.variant(forward)(state, x)
    chex.assert_shape(out.logits, (3, 7))
    chex.assert_shape([out.token_depth, out.ponder], (3, 17))
    chex.assert_shape(out.halting_mean, (4,))
    chex.assert_shape(out.halting_scores, (3, 4, 17))
    chex.assert_type([out.logits, out.token_depth, out.ponder, out.halting_mean], jnp.float32)
    reference = model(x)
    chex.assert_trees_all_close(out, reference, atol=1e-5, rtol=1e-5)

  def test_compiles_once_across_batches(self):
    model = models.create(small_config(), seed=0)
    graphdef, state = nnx.split(model)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(state, x):
      return nnx.merge(graphdef, state)(x).logits

    for seed in range(3):
      forward(state, images(seed=seed)).block_until_ready()

  def test_every_token_halts_and_depths_are_consistent(self):
    model = models.create(small_config(), seed=1)
    lift_halting_neuron(model, 0.5)
    out = model(images(batch=4))
    depth, rho, scores = np.asarray(out.token_depth), np.asarray(out.ponder), np.asarray(
        out.halting_scores)
    layers = model.depth
    self.assertTrue(((depth >= 1) & (depth <= layers)).all())
    self.assertTrue(np.array_equal(depth, np.round(depth)))
    # The profile must actually vary, or the checks below are vacuous.
    self.assertGreater(len(np.unique(depth)), 2)
    # rho = n + R, R = 1 - the scores of the layers before the halting layer.
    for b in range(depth.shape[0]):
      for k in range(depth.shape[1]):
        n = int(depth[b, k])
        remainder = 1.0 - scores[b, :n - 1, k].sum()
        np.testing.assert_allclose(rho[b, k], n + remainder, rtol=1e-5, atol=1e-5)
        # Halting happened at layer n (or the last layer forced it), never before.
        cumulative = np.cumsum(scores[b, :, k])
        self.assertTrue((cumulative[:n - 1] < 1 - model.eps).all())
        if n < layers:
          self.assertGreater(cumulative[n - 1], 1 - model.eps)

  def test_halting_mean_is_mean_of_scores(self):
    model = models.create(small_config(), seed=2)
    out = model(images())
    np.testing.assert_allclose(out.halting_mean, np.asarray(out.halting_scores).mean(axis=(0, 2)),
                               rtol=1e-6)

  def test_nothing_halts_early_equals_plain_deit(self):
    config = small_config()
    avit = models.create(config, seed=3)
    deit = models.create(small_config(halting=False), seed=3)
    x = images()
    plain = deit(x)
    # gate centre so large that sigmoid is exactly 0 before the last layer.
    never = models.create(small_config(gate_center=1e4), seed=3)
    out = never(x)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(plain.logits))
    np.testing.assert_array_equal(np.asarray(out.token_depth), float(config.depth))
    np.testing.assert_array_equal(np.asarray(plain.token_depth), float(config.depth))
    # Same parameters whatever the halting flag: the flag only changes the forward.
    chex.assert_trees_all_equal(nnx.state(avit, nnx.Param), nnx.state(deit, nnx.Param))

  def test_halted_token_cannot_influence_active_tokens(self):
    block = Block(32, 4, mlp_ratio=4.0, drop=0.0, attn_drop=0.0, drop_path=0.0,
                  dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 9, 32))
    mask = jnp.array([[1, 1, 0, 1, 0, 0, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0, 0, 1]], jnp.float32)
    noise = 100.0 * jax.random.normal(jax.random.key(1), x.shape) * (1 - mask)[..., None]
    active = mask.astype(bool)
    a, b = block(x, mask=mask), block(x + noise, mask=mask)
    np.testing.assert_array_equal(np.asarray(a)[active], np.asarray(b)[active])

  def test_halted_tokens_never_change_logits(self):
    model = models.create(small_config(), seed=4)
    lift_halting_neuron(model, 0.4)
    x = images(batch=2, seed=5)
    reference = model(x)
    self.assertLess(float(reference.token_depth.min()), model.depth)

    # Same loop as AViT.run_halting but halted tokens get garbage instead of zeros.
    def noisy_forward():
      tokens = model.embed(x)
      state = halting_lib.init_state(tokens.shape[:2])
      output = jnp.zeros(tokens.shape)
      for layer, block in enumerate(model.blocks):
        garbage = 1e3 * jax.random.normal(jax.random.key(layer), tokens.shape)
        tokens = jnp.where(state.mask[..., None] > 0, tokens, garbage)
        tokens = block(tokens, mask=state.mask)
        state, weight, _ = model.halting_step(state, tokens, layer)
        output = halting_lib.accumulate(output, tokens, weight)
      return model.forward_head(model.norm(output)), state.depth

    logits, depth = noisy_forward()
    np.testing.assert_array_equal(np.asarray(depth), np.asarray(reference.token_depth))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference.logits), atol=1e-6)

  def test_wrong_images_raise_value_error_naming_the_shape(self):
    model = models.create(small_config(), seed=0)
    for bad in (jnp.zeros((16, 16, 3)), jnp.zeros((2, 16, 16, 1)), jnp.zeros((2, 32, 32, 3))):
      with self.assertRaisesRegex(ValueError, r'expected images of shape \[B, 16, 16, 3\]'):
        model(bad)
    with self.assertRaisesRegex(ValueError, 'floating-point'):
      model(jnp.zeros((2, 16, 16, 3), jnp.uint8))

  def test_invalid_model_config_fails_before_building(self):
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r'^config.model.patch=5 is invalid: it must divide model.image_size=16$'):
      models.create(small_config(patch=5))
    with self.assertRaisesRegex(ValueError, r'config.model.gate_scale=0.0 is invalid: expected > 0'):
      models.create(small_config(gate_scale=0.0))
    with self.assertRaisesRegex(ValueError, r'config.model.eps=1.5 is invalid: expected a value in '
                                r'\(0, 1\)'):
      models.create(small_config(eps=1.5))

  def test_timm_parameter_names_and_shapes(self):
    model = models.create(config_lib.model_config('tiny'), seed=0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shapes = jax.tree.map(np.shape, params)
    self.assertEqual(shapes['patch_embed']['proj']['kernel'], (16, 16, 3, 192))
    self.assertEqual(shapes['pos_embed'], (1, 197, 192))
    self.assertEqual(shapes['cls_token'], (1, 1, 192))
    self.assertEqual(shapes['blocks'][11]['attn']['qkv']['kernel'], (192, 576))
    self.assertEqual(shapes['blocks'][0]['mlp']['fc1']['kernel'], (192, 768))
    self.assertEqual(shapes['head']['kernel'], (192, 1000))
    count = sum(np.prod(s) for s in jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))
    self.assertEqual(count, 5_717_416)  # timm's deit_tiny_patch16_224 parameter count

  def test_create_gives_a_model_in_eval_mode(self):
    """Repeated calls on the same images agree, with drop path and dropout configured."""
    model = models.create(small_config(drop_rate=0.1, drop_path_rate=0.3), seed=0)
    x = images()
    np.testing.assert_array_equal(np.asarray(model(x).logits), np.asarray(model(x).logits))

  def test_dropout_and_drop_path_only_in_training(self):
    config = small_config(drop_rate=0.1, drop_path_rate=0.3)
    model = models.create(config, seed=0)
    x = images()
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x).logits), np.asarray(model(x).logits))
    model.train()
    a, b = model(x).logits, model(x).logits
    self.assertGreater(float(jnp.abs(a - b).max()), 1e-4)

  def test_bfloat16_compute_keeps_float32_params(self):
    x = images()
    fp32 = models.create(small_config(), seed=0)
    bf16 = models.create(small_config(dtype='bfloat16'), seed=0)
    chex.assert_trees_all_equal_dtypes(nnx.state(bf16, nnx.Param), nnx.state(fp32, nnx.Param))
    out = bf16(x)
    self.assertEqual(out.logits.dtype, jnp.float32)
    np.testing.assert_allclose(out.logits, fp32(x).logits, atol=0.1)

  def test_gelu_is_the_exact_gelu(self):
    # The erf form (PyTorch's) against jax's erfc form, values and gradients, and the
    # textbook values x * Phi(x) at a few points.
    x = jnp.linspace(-12.0, 12.0, 4001, dtype=jnp.float32)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
    grad = jax.vmap(jax.grad(gelu))(x)
    reference = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(grad, reference, atol=1e-6)
    np.testing.assert_allclose(gelu(jnp.array([-1.0, 0.0, 1.0, 2.0])),
                               [-0.15865525, 0.0, 0.84134475, 1.95449974], rtol=1e-6)
    self.assertEqual(gelu(jnp.ones(3, jnp.bfloat16)).dtype, jnp.bfloat16)


class HaltingUpdateTest(chex.TestCase):

  def test_accumulation_weights_sum_to_one(self):
    layers, batch, tokens = 6, 4, 10
    scores = jax.random.uniform(jax.random.key(0), (layers, batch, tokens), maxval=0.6)
    state = halting_lib.init_state((batch, tokens))
    output = jnp.zeros((batch, tokens, layers))
    for layer in range(layers):
      # y = one-hot of the layer, so output[..., l] is the weight layer l got.
      y = jnp.broadcast_to(jax.nn.one_hot(layer, layers), (batch, tokens, layers))
      h = jnp.ones((batch, tokens)) if layer == layers - 1 else scores[layer]
      state, weight = halting_lib.update(state, h, eps=0.01)
      output = halting_lib.accumulate(output, y, weight)
    weights = np.asarray(output)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    self.assertTrue((np.asarray(state.mask) == 0).all())
    # A token's weights are its scores before halting, then the remainder.
    np.testing.assert_allclose(weights[0, 0, 0], scores[0, 0, 0], rtol=1e-6)
    depth = np.asarray(state.depth)
    np.testing.assert_allclose(np.asarray(state.ponder), depth + weights[
        np.arange(batch)[:, None], np.arange(tokens)[None], depth.astype(int) - 1], rtol=1e-6)

  def test_hand_worked_token(self):
    # One token: scores 0.3, 0.5, 0.4 (eps 0.01) -> c = 0.3, 0.8, 1.2: halts at layer 3,
    # weights 0.3, 0.5, R = 0.2; rho = 3 + 0.2; depth 3.
    state = halting_lib.init_state((1, 1))
    output = jnp.zeros((1, 1, 1))
    for layer, h in enumerate((0.3, 0.5, 0.4, 0.9)):
      y = jnp.full((1, 1, 1), float(10 ** layer))
      state, weight = halting_lib.update(state, jnp.full((1, 1), h), eps=0.01)
      output = halting_lib.accumulate(output, y, weight)
    np.testing.assert_allclose(output[0, 0, 0], 0.3 * 1 + 0.5 * 10 + 0.2 * 100, rtol=1e-6)
    np.testing.assert_allclose(state.ponder[0, 0], 3.2, rtol=1e-6)
    self.assertEqual(float(state.depth[0, 0]), 3.0)
    self.assertEqual(float(state.mask[0, 0]), 0.0)
