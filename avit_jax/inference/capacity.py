"""'capacity' mode: a static token budget per layer, so the whole forward is one graph with
no host read-back (for TPUs); and the check of user-given budgets."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from avit_jax.inference.common import Results, finish, map_chunks, update_class_output
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
  zeros = jnp.zeros((b, n), jnp.float32)
  state = halting_lib.HaltingState(cumulative=zeros, remainder=zeros + 1.0, mask=zeros + 1.0,
                                   ponder=zeros, depth=zeros + 1.0, output=zeros[..., None])
  results = Results(depth=zeros + 1.0, ponder=zeros, scores=jnp.zeros((b, depth, n)),
                    class_output=jnp.zeros((b, d), jnp.float32))
  image = jnp.arange(b)[:, None]
  for layer, (block, budget) in enumerate(zip(model.blocks, capacity)):
    running = state.mask > 0
    priority = jnp.where(running, jnp.where(token == 0, -1.0, state.cumulative), jnp.inf)
    _, slots = jax.lax.top_k(-priority, budget)  # [B, K]
    # Cut tokens halt where they are: depth = layers run, ponder = depth + remainder.
    cut = running & ~jnp.zeros(running.shape, bool).at[image, slots].set(True)
    cut_token = jnp.where(cut, token, n)  # n: dropped
    results = dataclasses.replace(
        results, depth=results.depth.at[image, cut_token].set(state.depth - 1.0, mode='drop'),
        ponder=results.ponder.at[image, cut_token].set(state.ponder + state.remainder,
                                                       mode='drop'))
    x, token = x[image, slots], token[image, slots]
    state = jax.tree.map(lambda a: a[image, slots], state)

    mask = state.mask
    x = block(x * mask[..., None].astype(x.dtype), mask=mask)
    score = halting_lib.halting_score(x, model.gate_scale, model.gate_center)
    h = jnp.ones_like(score) if layer == depth - 1 else score
    new = halting_lib.update(state, x, h, model.eps)

    # The class token's output accumulator (the only one the head reads).
    class_row = (jnp.arange(b), jnp.argmax(token == 0, axis=1))
    is_class = (token[class_row] == 0) & (mask[class_row] > 0)
    ran = jnp.where(mask > 0, token, n)  # n: dropped
    results = Results(
        depth=results.depth.at[image, ran].set(new.depth, mode='drop'),
        ponder=results.ponder.at[image, ran].set(new.ponder, mode='drop'),
        scores=results.scores.at[image, layer, ran].set(score, mode='drop'),
        class_output=update_class_output(state, class_row, is_class, x, h,
                                         results.class_output, model.eps))
    state = dataclasses.replace(new, output=state.output)
  return finish(model, b, n, results)


def check(capacity, model: AViT) -> tuple[int, ...]:
  """The budgets as a tuple of ints, or a ValueError saying what is expected."""
  n, depth = model.num_patches + 1, model.depth
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
