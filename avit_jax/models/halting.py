"""A-ViT's per-token halting: the state, and one layer's halting step (pure jnp).

The steps of docs/algorithm.md "Halting", written once for every way of running a model:
the masked training graph (models/avit.py) runs them on [B, N] tokens, token removal
(inference/) on whatever rows it keeps. Nothing here branches on array values, so a
jitted forward compiles once per shape.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HaltingState:
  """Per token, all float32 of one shape ([B, N], or [R] for packed rows).

  cumulative: summed halting score c.   remainder: R.   mask: 1 while the token runs.
  ponder: rho.   depth: layers run so far (n).
  """
  cumulative: jax.Array
  remainder: jax.Array
  mask: jax.Array
  ponder: jax.Array
  depth: jax.Array


def init_state(shape) -> HaltingState:
  """The state before the first layer: every token running, c = rho = 0, R = n = 1."""
  zeros = jnp.zeros(shape, jnp.float32)
  ones = jnp.ones(shape, jnp.float32)
  return HaltingState(cumulative=zeros, remainder=ones, mask=ones, ponder=zeros, depth=ones)


def halting_score(y: jax.Array, gate_scale: float, gate_center: float) -> jax.Array:
  """h = sigmoid(gamma * y[..., 0] - beta), float32, from block outputs y [..., D]."""
  return jax.nn.sigmoid(gate_scale * y[..., 0].astype(jnp.float32) - gate_center)


def update(state: HaltingState, h: jax.Array, eps: float) -> tuple[HaltingState, jax.Array]:
  """Steps 4-7 of one layer, given each token's halting score h (1 at the last layer).

  Returns (new state, weight): `weight` is what the layer's output adds to each token's
  output accumulator (`accumulate`), 0 for tokens that did not run.
  """
  m = state.mask
  # Tokens that no longer run keep their state (their c is past the threshold, so adding
  # their score would change nothing else), whatever their rows hold: token removal
  # leaves stale values, even NaN, in rows it does not compute.
  h = jnp.where(m > 0, h, 0.0)
  threshold = 1.0 - eps
  cumulative = state.cumulative + h
  reached = (cumulative > threshold).astype(jnp.float32) * m
  running = (cumulative < threshold).astype(jnp.float32)
  weight = m * (state.remainder * reached + h * running)
  new = HaltingState(
      cumulative=cumulative,
      remainder=state.remainder - h * running,
      mask=running,
      ponder=state.ponder + m + state.remainder * reached,
      depth=state.depth + running,
  )
  return new, weight


def layer_step(state: HaltingState, y: jax.Array, is_last, *, gate_scale: float,
               gate_center: float, eps: float) -> tuple[HaltingState, jax.Array, jax.Array]:
  """One layer's halting step from the block outputs y [..., D] of the tokens in `state`:
  the score, h = 1 at the last layer (is_last: a bool, or traced in a loop over layers),
  and `update`. Returns (new state, weight, score), score before the last-layer override
  (the prior's H[l]; meaningless for tokens that did not run).
  """
  score = halting_score(y, gate_scale, gate_center)
  new, weight = update(state, jnp.where(is_last, 1.0, score), eps)
  return new, weight, score


def accumulate(output: jax.Array, y: jax.Array, weight: jax.Array) -> jax.Array:
  """The mean-field output: output [..., D] + y [..., D] * weight [...], in float32."""
  return output + y.astype(jnp.float32) * weight[..., None]
