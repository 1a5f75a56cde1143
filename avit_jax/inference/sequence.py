"""compact's sequence layout (batch 1): [B, N] with the running tokens first, in their order;
each layer runs `vit.Block` on the first n positions, n the running count rounded up to a
length bucket, the padding masked as keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from avit_jax.inference.common import block_at, removal_output, run_if, update_special_outputs
from avit_jax.models import halting as halting_lib


def _running_first(running):
  """Per row of running [B, N] (bool): the source indices [B, N] (int32) of the permutation
  that puts the running tokens first, each part in its original order."""
  b, n = running.shape
  before_running = jnp.cumsum(running, axis=1) - 1
  before_halted = jnp.cumsum(~running, axis=1) - 1 + jnp.sum(running, axis=1, keepdims=True)
  dest = jnp.where(running, before_running, before_halted)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
  return jnp.zeros((b, n), jnp.int32).at[rows, dest].set(
      jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), unique_indices=True)


def forward(model, x, plan):
  b, n, d = x.shape
  depth, p = model.depth, model.num_prefix_tokens
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
  lengths = jnp.asarray(plan.lengths, jnp.int32)

  def run_layer(layer, carry):
    x, state, token, scores, outputs = carry
    block = block_at(model, layer)
    mask = state.mask
    count = jnp.max(jnp.sum(mask > 0, axis=1))
    bucket = lengths[jnp.minimum(jnp.searchsorted(lengths, count), len(plan.lengths) - 1)]

    def run(length):
      def fn(x):
        out = block(x[:, :length], key_mask=mask[:, :length] > 0)
        return jax.lax.dynamic_update_slice_in_dim(x, out, 0, axis=1)
      return fn

    y = x
    for length in plan.lengths:  # the one bucket that holds the running tokens
      y = run_if((count > 0) & (bucket == length), run(length), y)
    new, weight, score = model.halting_step(state, y, layer)
    with jax.named_scope('halting'):
      ran = mask > 0
      scores = scores.at[rows, layer, token].set(jnp.where(ran, score, 0.0))
      # The special tokens, while they run, are among the first P positions.
      first = lambda a: a[:, :p].reshape(b * p, *a.shape[2:])  # noqa: E731
      outputs = update_special_outputs(outputs, first(rows), first(token), first(ran),
                                       first(y), first(weight))

    def repack(carry):
      y, new, token = carry
      source = _running_first(new.mask > 0)
      take = lambda a: jnp.take_along_axis(  # noqa: E731
          a, source.reshape(source.shape + (1,) * (a.ndim - 2)), axis=1)
      return take(y), jax.tree.map(take, new), take(token)

    # Nothing to move in the layers where no token halted (most of the first ones).
    with jax.named_scope('repack'):
      y, new, token = run_if(jnp.any(new.mask != mask), repack, (y, new, token))
    return y, new, token, scores, outputs

  carry = (x, halting_lib.init_state((b, n)),
           jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
           jnp.zeros((b, depth, n), jnp.float32), jnp.zeros((b, p, d), jnp.float32))
  _, state, token, scores, outputs = jax.lax.fori_loop(0, depth, run_layer, carry)
  restore = lambda a: jnp.zeros_like(a).at[rows, token].set(a, unique_indices=True)  # noqa: E731
  return removal_output(model, outputs, restore(state.depth), restore(state.ponder), scores)
