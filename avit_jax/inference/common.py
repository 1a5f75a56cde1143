"""What every inference mode shares: chunking, the parameters as flat leaves, and the
class-token accumulator and head of the token-removal modes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from avit_jax.models import halting as halting_lib
from avit_jax.models.avit import AViT, AViTOutput

# Token states per chunk on CPU: 8 images of DeiT-T (8 * 197 * 192 ~ 2^18 floats), the
# measured sweet spot; a model with fewer tokens or a narrower width gets more images.
CPU_CHUNK_FLOATS = 1 << 18


def default_chunk_size(model: AViT) -> int:
  """Images per chunk on CPU (cache-sized token states; 8 for DeiT-T, 4 for DeiT-S, 256 for
  the Fashion-MNIST default), 0 (whole batch) on accelerators."""
  if jax.default_backend() != 'cpu':
    return 0
  floats = model.num_tokens * model.cls_token.shape[-1]
  return 1 << max(0, round(math.log2(max(1.0, CPU_CHUNK_FLOATS / floats))))


def num_chunks(batch: int, chunk_size: int) -> int:
  """Number of equal chunks a batch runs in (1 when chunking is off or does not divide it)."""
  if chunk_size <= 0 or batch <= chunk_size or batch % chunk_size:
    return 1
  return batch // chunk_size


def map_chunks(fn, images: jax.Array, chunk_size: int):
  """Applies fn to equal chunks of the batch with lax.map (one compiled body).

  Returns (outputs with chunks concatenated along axis 0, number of chunks).
  """
  n = num_chunks(images.shape[0], chunk_size)
  if n == 1:
    return fn(images), 1
  stacked = jax.lax.map(fn, images.reshape(n, -1, *images.shape[1:]))
  return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stacked), n


class ParamLeaves:
  """A module's state as a flat tuple of arrays; `merge` rebuilds the module inside a trace.

  Jitted functions take the leaves, not the nnx graph or State: hashing a GraphDef as a
  static argument and flattening an nnx State cost milliseconds per call.
  """

  def __init__(self, module: nnx.Module):
    self.graphdef, state = nnx.split(module)
    self.leaves, self.treedef = jax.tree.flatten(state)

  def merge(self, leaves):
    return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


def class_logits(model: AViT, class_output: jax.Array) -> jax.Array:
  """Final norm and head on each image's class-token output [B, D] -> logits [B, C]."""
  return model.forward_head(model.norm(class_output[:, None, :].astype(model.dtype)))


def update_class_output(class_output, is_class, y, weight):
  """The class tokens' output accumulators [B, D] after a layer: y [B, D] * weight [B]
  added where is_class [B] (the image's class token ran this layer)."""
  return jnp.where(is_class[:, None], halting_lib.accumulate(class_output, y, weight),
                   class_output)


def removal_output(model: AViT, logits, token_depth, ponder, halting_scores) -> AViTOutput:
  """AViTOutput of a token-removal mode: halting_mean, a training quantity, is 0."""
  return AViTOutput(logits=logits, token_depth=token_depth, ponder=ponder,
                    halting_mean=jnp.zeros((model.depth,), jnp.float32),
                    halting_scores=halting_scores)
