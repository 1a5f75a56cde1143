"""'capacity' mode: a static token budget per layer, so the whole forward is one graph with
no host read-back (for TPUs); and the check of user-given budgets."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from avit_jax.inference.common import (class_logits, map_chunks, removal_output,
                                       update_class_output)
from avit_jax.models import halting as halting_lib
from avit_jax.models.avit import AViT


def predict(model, images, chunk_size, capacity):
  """The capacity forward on chunks of `chunk_size` images (one compiled body)."""
  out, _ = map_chunks(functools.partial(_forward, model, capacity), images, chunk_size)
  # lax.map stacked (and the reshape flattened) halting_mean: it is 0 here anyway.
  return dataclasses.replace(out, halting_mean=jnp.zeros((model.depth,), jnp.float32))


def _forward(model, capacity, images):
  """One static graph: before layer l each image keeps at most capacity[l] running tokens.

  Per image the tokens live in capacity[l] slots: the running ones (the class token first,
  then those with the lowest summed halting score, which have the longest still to run) up
  to the budget, then halted ones as masked filler. A running token that finds no slot is
  cut: it halts where it is, as if its score had crossed the threshold at the last layer it
  ran (depth = layers run, ponder = depth + remainder).
  """
  x = model.embed(images)
  b, n, d = x.shape
  depth = model.depth
  token = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  state = halting_lib.init_state((b, n))
  final_depth, final_ponder = state.depth, state.ponder
  scores = jnp.zeros((b, depth, n), jnp.float32)
  class_output = jnp.zeros((b, d), jnp.float32)
  tokens_cut = jnp.zeros((b,), jnp.int32)
  image = jnp.arange(b)[:, None]
  for layer, (block, budget) in enumerate(zip(model.blocks, capacity)):
    running = state.mask > 0
    priority = jnp.where(running, jnp.where(token == 0, -1.0, state.cumulative), jnp.inf)
    _, slots = jax.lax.top_k(-priority, budget)  # [B, K]
    # Cut tokens halt where they are: depth = layers run, ponder = depth + remainder.
    cut = running & ~jnp.zeros(running.shape, bool).at[image, slots].set(True)
    cut_token = jnp.where(cut, token, n)  # n: dropped
    tokens_cut = tokens_cut + cut.sum(axis=1, dtype=jnp.int32)
    final_depth = final_depth.at[image, cut_token].set(state.depth - 1.0, mode='drop')
    final_ponder = final_ponder.at[image, cut_token].set(state.ponder + state.remainder,
                                                         mode='drop')
    x, token = x[image, slots], token[image, slots]
    state = jax.tree.map(lambda a: a[image, slots], state)

    mask = state.mask
    x = block(x * mask[..., None].astype(x.dtype), mask=mask)
    new, weight, score = model.halting_step(state, x, layer)
    ran = jnp.where(mask > 0, token, n)  # n: dropped
    final_depth = final_depth.at[image, ran].set(new.depth, mode='drop')
    final_ponder = final_ponder.at[image, ran].set(new.ponder, mode='drop')
    scores = scores.at[image, layer, ran].set(score, mode='drop')
    # The class token's output accumulator (the only one the head reads).
    class_slot = jnp.argmax(token == 0, axis=1)
    rows = jnp.arange(b)
    is_class = (token[rows, class_slot] == 0) & (mask[rows, class_slot] > 0)
    class_output = update_class_output(class_output, is_class, x[rows, class_slot],
                                       weight[rows, class_slot])
    state = new
  return dataclasses.replace(
      removal_output(model, class_logits(model, class_output), final_depth, final_ponder,
                     scores), tokens_cut=tokens_cut)


def check(capacity, model: AViT) -> tuple[int, ...]:
  """The budgets as a tuple of ints, or a ValueError saying what is expected."""
  n, depth = model.num_tokens, model.depth
  hint = ('pass capacity=(K_1, ..., K_L), one token budget per layer, e.g. '
          'inference.calibrate_capacity(model, images)')
  if capacity is None:
    raise ValueError(f"mode 'capacity' needs a token budget per layer: {hint}")
  budgets = tuple(capacity)
  if (len(budgets) != depth or not all(isinstance(k, (int, np.integer)) for k in budgets)
      or not all(1 <= k <= n for k in budgets)):
    raise ValueError(f'capacity must be {depth} integers in [1, {n}] (layers, tokens of this '
                     f'model), got {capacity!r}: {hint}')
  return tuple(int(k) for k in budgets)
