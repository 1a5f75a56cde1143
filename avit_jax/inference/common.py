"""What the inference modes share: chunking, the parameters as flat leaves, and the class-token
head of token removal."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from avit_jax.models import halting as halting_lib
from avit_jax.models.avit import AViT, AViTOutput

# Token-state floats per chunk on CPU: small enough that a chunk's activations stay in the
# CPU caches between the matmuls of a block, large enough that each matmul stays efficient.
_CPU_CHUNK_FLOATS = 1 << 18


def default_chunk_size(model: AViT) -> int:
  """Images per chunk: on CPU a cache-sized batch of token states (more images for models
  with fewer tokens or a narrower width), on accelerators 0 (the whole batch)."""
  if jax.default_backend() != 'cpu':
    return 0
  floats = model.num_tokens * model.cls_token.shape[-1]
  return 1 << max(0, round(math.log2(max(1.0, _CPU_CHUNK_FLOATS / floats))))


def map_chunks(fn, images: jax.Array, chunk_size: int):
  """fn over equal chunks of the batch with lax.map (one compiled body): (outputs with the
  chunks concatenated, number of chunks). One chunk when chunking is off or does not divide
  the batch."""
  b = images.shape[0]
  if chunk_size <= 0 or b <= chunk_size or b % chunk_size:
    return fn(images), 1
  n = b // chunk_size
  stacked = jax.lax.map(fn, images.reshape(n, -1, *images.shape[1:]))
  return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stacked), n


class Predictor:
  """predict(images) -> AViTOutput, `forward(model, images)` jitted: one program per batch
  shape. The jitted function takes the model's arrays as a flat tuple (hashing an nnx graph
  or flattening an nnx State would cost time on every call), the model's own arrays, not
  copies: the weights are on the device once."""

  def __init__(self, model: AViT, forward):
    self.model = model
    self._graphdef, state = nnx.split(model)
    self._leaves, self._treedef = jax.tree.flatten(state)
    self._traces = 0

    def run(leaves, images):
      self._traces += 1  # jit traces each new batch shape once, then compiles it
      return forward(nnx.merge(self._graphdef, jax.tree.unflatten(self._treedef, leaves)),
                     images)

    self.jitted = jax.jit(run)
    """The jax.jit forward, called as jitted(*arguments(images)) (e.g. for jax.export)."""

  def __call__(self, images: jax.Array) -> AViTOutput:
    self.model.check_images(images)
    return self.jitted(*self.arguments(images))

  def arguments(self, images) -> tuple:
    return self._leaves, images

  def set_params(self, model: AViT) -> None:
    """Takes the parameters of `model` (same structure) without compiling again."""
    leaves, treedef = jax.tree.flatten(nnx.state(model))
    if treedef != self._treedef:
      raise ValueError('set_params needs a model of the same structure')
    self._leaves = leaves

  def compiled_count(self) -> int:
    """Programs compiled so far (one per batch shape)."""
    return self._traces


def update_special_outputs(outputs, image, token, ran, y, weight):
  """The special tokens' (class, distillation) output accumulators [B, P, D] after a layer,
  from candidate rows image, token [K] (int32), ran [K] (bool), y [K, D], weight [K]: a row
  adds y * weight to outputs[image, token] where it ran and holds a special token."""
  b, p = outputs.shape[:2]
  keep = ran & (token < p)
  image, token = jnp.where(keep, image, b), jnp.where(keep, token, 0)
  current = outputs[jnp.minimum(image, b - 1), token]
  return outputs.at[image, token].set(halting_lib.accumulate(current, y, weight), mode='drop')


def removal_output(model: AViT, outputs, token_depth, ponder, halting_scores) -> AViTOutput:
  """AViTOutput of token removal from the special tokens' outputs [B, P, D], all the heads
  read; halting_mean, a training quantity, is 0."""
  logits, dist_logits = model.forward_heads(model.norm(outputs.astype(model.dtype)))
  return AViTOutput(logits=logits, token_depth=token_depth, ponder=ponder,
                    halting_mean=jnp.zeros((model.depth,), jnp.float32),
                    halting_scores=halting_scores, dist_logits=dist_logits)


def run_if(condition, fn, carry):
  """fn(carry) if condition else carry, as a loop of 0 or 1 trips: unlike a conditional,
  which copies every buffer it returns, a loop updates its carry in place. fn must compute
  from its carry: XLA hoists work that reads only values from outside a loop out of it."""
  return jax.lax.fori_loop(0, condition.astype(jnp.int32), lambda _, c: fn(c), carry)


def block_at(model: AViT, layer) -> nnx.Module:
  """Block `layer` (traced) of `model`: block 0's graph with that layer's parameters (the
  blocks differ only in their drop-path rate, which eval mode ignores). The parameters are
  picked from the model's own per-block arrays, not from a stacked copy of them."""
  graphdef, _, rest = nnx.split(model.blocks[0], nnx.Param, ...)
  params = [nnx.split(block, nnx.Param, ...)[1] for block in model.blocks]
  if any(jax.tree.structure(p) != jax.tree.structure(params[0]) for p in params):
    raise ValueError('compact inference needs blocks of identical parameter structure')
  picked = jax.lax.switch(layer, [lambda p=p: p for p in params])
  return nnx.merge(graphdef, picked, rest)
