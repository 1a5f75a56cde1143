"""compact's sequence layout (batch 1): [B, N] with each image's running tokens first, in
their order; each layer runs `vit.Block` on the first n positions, n the longest image's
count rounded up to a length bucket, the padding masked as keys. No grouping, no packing."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from avit_jax.inference.common import class_logits, removal_output, update_class_output
from avit_jax.inference.shapes import Plan, bucket_of, run_if, select
from avit_jax.models import halting as halting_lib


def _running_first(running):
  """Per row of running [B, N] (bool): the permutation that puts running tokens first,
  each group in its original order. Returns source indices [B, N] (int32)."""
  b, n = running.shape
  before_running = jnp.cumsum(running, axis=1) - 1
  before_halted = jnp.cumsum(~running, axis=1) - 1 + jnp.sum(running, axis=1, keepdims=True)
  dest = jnp.where(running, before_running, before_halted)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
  return jnp.zeros((b, n), jnp.int32).at[rows, dest].set(
      jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), unique_indices=True)


def forward(model, blocks, stacked, x, plan: Plan):
  b, n, d = x.shape
  depth = model.depth
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))

  def run_layer(layer, carry):
    x, state, token, scores, class_output = carry
    block = blocks.block(stacked, layer)
    mask = state.mask
    bucket = bucket_of(jnp.max(jnp.sum(mask, axis=1)), plan.lengths)

    def run(length):
      def fn(x):
        out = block(x[:, :length], key_mask=mask[:, :length] > 0)
        return jax.lax.dynamic_update_slice_in_dim(x, out, 0, axis=1)
      return fn

    y = select(bucket, plan.lengths, run, x)
    new, weight, score = model.halting_step(state, y, layer)
    with jax.named_scope('halting'):
      ran = mask > 0
      scores = scores.at[rows, layer, token].set(jnp.where(ran, score, 0.0))
      class_output = update_class_output(class_output, (token[:, 0] == 0) & ran[:, 0],
                                         y[:, 0], weight[:, 0])

    def compact(carry):
      y, new, token = carry
      source = _running_first(new.mask > 0)
      take = lambda a: jnp.take_along_axis(  # noqa: E731
          a, source.reshape(source.shape + (1,) * (a.ndim - 2)), axis=1)
      return take(y), jax.tree.map(take, new), take(token)

    # Nothing to move in the layers where no token halted (the first ones, mostly).
    with jax.named_scope('repack'):
      y, new, token = run_if(jnp.any(new.mask != mask), compact, (y, new, token))
    return y, new, token, scores, class_output

  carry = (x, halting_lib.init_state((b, n)), jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32),
                                                                  (b, n)),
           jnp.zeros((b, depth, n), jnp.float32), jnp.zeros((b, d), jnp.float32))
  _, state, token, scores, class_output = jax.lax.fori_loop(0, depth, run_layer, carry)
  restore = lambda a: jnp.zeros_like(a).at[rows, token].set(a, unique_indices=True)  # noqa: E731
  return removal_output(model, class_logits(model, class_output), restore(state.depth),
                        restore(state.ponder), scores)
