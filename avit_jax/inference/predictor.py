"""Static-shape inference: dense DeiT, the masked training graph and the token-budget
('capacity') graph, each one jitted program per batch shape."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from avit_jax.inference import capacity as capacity_lib
from avit_jax.inference.common import ParamLeaves, map_chunks
from avit_jax.models.avit import AViT, AViTOutput


def _dense(model, images, chunk_size):

  def one(x):
    return model.forward_head(model.forward_features(x))

  logits, _ = map_chunks(one, images, chunk_size)
  b, n, depth = images.shape[0], model.num_tokens, model.depth
  full = jnp.full((b, n), float(depth), jnp.float32)
  return AViTOutput(logits=logits, token_depth=full, ponder=full,
                    halting_mean=jnp.zeros((depth,), jnp.float32),
                    halting_scores=jnp.zeros((b, depth, n), jnp.float32))


def _masked(model, images, chunk_size):
  out, n = map_chunks(model, images, chunk_size)
  if n == 1:
    return out
  # lax.map stacked halting_mean [chunks, L] and the reshape above flattened it; chunks
  # are equal-sized, so the mean of chunk means is the mean over the batch.
  return dataclasses.replace(out, halting_mean=out.halting_mean.reshape(n, -1).mean(0))


class Predictor:
  """predict(images) -> AViTOutput for 'dense', 'masked' or 'capacity': one program per
  batch shape."""

  def __init__(self, model: AViT, mode: str, *, chunk_size: int,
               capacity: tuple[int, ...] | None = None):
    self.model = model
    self.capacity = capacity
    params = ParamLeaves(model)
    fn = {'dense': _dense, 'masked': _masked,
          'capacity': functools.partial(capacity_lib.predict, capacity=capacity)}[mode]
    self._leaves = params.leaves
    self._jitted = jax.jit(lambda leaves, images: fn(params.merge(leaves), images, chunk_size))

  def set_params(self, model: AViT) -> None:
    """Takes the current parameters of `model` (same structure) without recompiling."""
    self._leaves = ParamLeaves(model).leaves

  def compiled_count(self) -> int:
    """Programs compiled so far (one per batch shape)."""
    return self._jitted._cache_size()  # pylint: disable=protected-access

  @property
  def jitted(self):
    """The jax.jit forward, called as jitted(*arguments(images)) (e.g. for jax.export)."""
    return self._jitted

  def arguments(self, images) -> tuple:
    return self._leaves, images

  def __call__(self, images: jax.Array) -> AViTOutput:
    self.model.check_images(images)
    return self._jitted(*self.arguments(images))
