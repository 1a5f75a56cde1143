"""A-ViT per-token halting state and its per-layer update (pure jnp, fixed shapes).

Implements ../shared/AVIT.md "Halting" steps 3-7. Shapes: B images, N tokens, D width.
Nothing here branches on array values, so a jitted forward compiles once per shape.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HaltingState:
  """Per image and token: all float32.

  cumulative: [B, N] summed halting score c.   remainder: [B, N] R.
  mask: [B, N] 1 while the token runs.          ponder: [B, N] rho.
  depth: [B, N] layers run so far (n).         output: [B, N, D] mean-field accumulator.
  """
  cumulative: jax.Array
  remainder: jax.Array
  mask: jax.Array
  ponder: jax.Array
  depth: jax.Array
  output: jax.Array


def init_state(batch: int, tokens: int, dim: int) -> HaltingState:
  zeros = jnp.zeros((batch, tokens), jnp.float32)
  ones = jnp.ones((batch, tokens), jnp.float32)
  return HaltingState(cumulative=zeros, remainder=ones, mask=ones, ponder=zeros, depth=ones,
                      output=jnp.zeros((batch, tokens, dim), jnp.float32))


def halting_score(y: jax.Array, gate_scale: float, gate_center: float) -> jax.Array:
  """h = sigmoid(gamma * y[..., 0] - beta): float32 [B, N] from block output [B, N, D]."""
  return jax.nn.sigmoid(gate_scale * y[..., 0].astype(jnp.float32) - gate_center)


def update(state: HaltingState, y: jax.Array, h: jax.Array, eps: float) -> HaltingState:
  """One layer's steps 4-7, given its block output y [B, N, D] and score h [B, N].

  At the last layer the caller passes h = 1, which halts every token still running.
  """
  threshold = 1.0 - eps
  m = state.mask
  y_m = y.astype(jnp.float32) * m[..., None]
  cumulative = state.cumulative + h
  ponder = state.ponder + m
  reached = (cumulative > threshold).astype(jnp.float32) * m
  running = (cumulative < threshold).astype(jnp.float32)
  output = state.output + y_m * (state.remainder * reached)[..., None]
  ponder = ponder + state.remainder * reached
  output = output + y_m * (h * running)[..., None]
  return HaltingState(
      cumulative=cumulative,
      remainder=state.remainder - h * running,
      mask=running,
      ponder=ponder,
      depth=state.depth + running,
      output=output,
  )
