"""What every inference mode shares: chunking, the parameters as flat leaves, the head on
class-token outputs and the class token's halting accumulator."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from avit_jax.models import halting as halting_lib
from avit_jax.models.avit import AViT, AViTOutput

# Token states per chunk on CPU: 8 images of DeiT-T (8 * 197 * 192 ~ 2^18 floats), the
# measured sweet spot; a model with fewer tokens or a narrower width gets more images.
CPU_CHUNK_FLOATS = 1 << 18


def default_chunk_size(model: AViT | None = None) -> int:
  """Images per chunk on CPU (cache-sized token states; 8 for DeiT-T, 4 for DeiT-S, 256 for
  the Fashion-MNIST default), 0 (whole batch) on accelerators."""
  if jax.default_backend() != 'cpu':
    return 0
  if model is None:
    return 8
  floats = (model.num_patches + 1) * model.cls_token.shape[-1]
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


class Params:
  """A module's parameters as a flat tuple of arrays; `merge` rebuilds it inside a trace.

  Jitted functions take the leaves, not the nnx graph or State: hashing a GraphDef as a
  static argument and flattening an nnx State cost milliseconds per call.
  """

  def __init__(self, module: nnx.Module):
    self.graphdef, state = nnx.split(module)
    self.leaves, self.treedef = jax.tree.flatten(state)

  def merge(self, leaves):
    return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Results:
  """Per image, original token layout: depth, ponder [B*N] (or [B, N]); scores [B*L*N] (or
  [B, L, N]); class token output (the halting accumulator) [B, D]. `finish` reshapes."""
  depth: jax.Array
  ponder: jax.Array
  scores: jax.Array
  class_output: jax.Array


def finish(model, b, n, results: Results):
  """Final norm and head on each image's class-token output; results back to [B, ...]."""
  features = model.norm(results.class_output[:, None, :].astype(model.dtype))
  depth = model.depth
  return AViTOutput(logits=model.forward_head(features),
                    token_depth=results.depth.reshape(b, n),
                    ponder=results.ponder.reshape(b, n),
                    halting_mean=jnp.zeros((depth,), jnp.float32),
                    halting_scores=results.scores.reshape(b, depth, n))


def update_class_output(state: halting_lib.HaltingState, index, is_class, y, h, class_output,
                        eps: float) -> jax.Array:
  """Halting update of the output accumulator of each image's class token only.

  state, y [*, D] and h hold every token of a layer; `index` picks each image's class-token
  row from them and `is_class` says whether that row holds its class token, running.
  Returns the new class outputs [B, D] (unchanged where is_class is False).
  """
  rows = jax.tree.map(lambda a: a[index], state)
  rows = dataclasses.replace(rows, mask=is_class.astype(jnp.float32), output=class_output)
  return halting_lib.update(rows, y[index], h[index], eps).output
