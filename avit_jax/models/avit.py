"""A-ViT: the DeiT backbone run with per-token adaptive halting (fixed-shape masks).

Follows docs/algorithm.md "Halting" step by step; with `halting=False` the same module
is plain DeiT, so baselines, DeiT training and A-ViT share parameters and code.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from avit_jax.models import halting as halting_lib
from avit_jax.models.vit import VisionTransformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AViTOutput:
  """logits: float32 [B, C]. token_depth: float32 [B, N], layers each token ran (1..L).

  ponder: float32 [B, N], rho = depth + remainder at the halting layer.
  halting_mean: float32 [L], mean halting score per layer over images and tokens (prior).
  halting_scores: float32 [B, L, N], each layer's score before the last-layer override.
  dist_logits: float32 [B, C], the distillation head's logits (distilled models only; the
  logits are then the mean of both heads in eval mode, the class head's in training mode).
  With halting off: depth = L, ponder = L, halting_mean and halting_scores are zero.
  """
  logits: jax.Array
  token_depth: jax.Array
  ponder: jax.Array
  halting_mean: jax.Array
  halting_scores: jax.Array
  dist_logits: jax.Array | None = None


class AViT(VisionTransformer):
  """DeiT/ViT whose tokens halt adaptively; `halting=False` gives plain DeiT."""

  def __init__(self, *, halting: bool, gate_scale: float, gate_center: float, eps: float,
               **backbone):
    super().__init__(**backbone)
    self.halting = halting
    self.gate_scale = float(gate_scale)
    self.gate_center = float(gate_center)
    self.eps = float(eps)

  def halting_step(self, state: halting_lib.HaltingState, y: jax.Array, layer):
    """This model's halting step after block `layer` (int, or traced in a loop over layers)."""
    with jax.named_scope('halting'):
      return halting_lib.layer_step(state, y, layer == self.depth - 1,
                                    gate_scale=self.gate_scale, gate_center=self.gate_center,
                                    eps=self.eps)

  def run_halting(self, x: jax.Array) -> tuple[halting_lib.HaltingState, jax.Array, jax.Array]:
    """Runs every block with halting on embedded tokens x [B, N, D] (the masked graph).

    Returns the final halting state, the output accumulator [B, N, D] and the per-layer
    scores [L, B, N].
    """
    b, n, d = x.shape
    state = halting_lib.init_state((b, n))
    output = jnp.zeros((b, n, d), jnp.float32)
    scores = []
    for layer, block in enumerate(self.blocks):
      mask = state.mask
      x = block(x * mask[..., None].astype(x.dtype), mask=mask)
      state, weight, score = self.halting_step(state, x, layer)
      output = halting_lib.accumulate(output, x, weight)
      scores.append(score)
    return state, output, jnp.stack(scores)

  def __call__(self, images: jax.Array) -> AViTOutput:
    """images: float [B, H, W, C], normalised, NHWC."""
    self.check_images(images)
    b = images.shape[0]
    n, depth = self.num_tokens, self.depth
    if not self.halting:
      logits, dist_logits = self.forward_heads(self.forward_features(images))
      full = jnp.full((b, n), float(depth), jnp.float32)
      return AViTOutput(logits=logits, token_depth=full, ponder=full,
                        halting_mean=jnp.zeros((depth,), jnp.float32),
                        halting_scores=jnp.zeros((b, depth, n), jnp.float32),
                        dist_logits=dist_logits)
    state, output, scores = self.run_halting(self.embed(images))
    # Every token keeps its own accumulated output: the heads read the class token's and
    # the distillation token's.
    features = self.norm(output.astype(self.dtype))
    logits, dist_logits = self.forward_heads(features)
    return AViTOutput(
        logits=logits,
        dist_logits=dist_logits,
        token_depth=state.depth,
        ponder=state.ponder,
        halting_mean=scores.mean(axis=(1, 2)),
        halting_scores=jnp.transpose(scores, (1, 0, 2)),
    )
