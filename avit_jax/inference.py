"""Inference modes of an A-ViT: dense DeiT, the masked training graph, and real token removal.

`make_predict_fn(model, mode)` returns `predict(images) -> AViTOutput`:
  dense    plain DeiT on every token (halting ignored): the baseline.
  masked   the training graph, `model(images)`: halted tokens are zeroed and masked but still
           computed. Reference answers.
  compact  halted tokens are removed for real. After every layer the still-running tokens of
           all images are packed together ([T, D], image-major, original order, so each
           image's class token comes first); qkv, proj and the MLP (most of the FLOPs) run on
           the packed tokens, attention runs per image on a [B, n, D] layout padded to the
           longest image, with padding masked as keys exactly like a halted token. T and n are
           rounded up to a few bucket sizes, so each block compiles once per bucket pair, and
           the two counts are read back to the host after each layer.
           Tokens keep running until they halt themselves, also after their image's class
           token halted: the logits no longer change then, but the depths (and FLOPs) of the
           other tokens must equal the masked model's. Same logits as masked (fp32 rounding)
           and identical token depths and ponder. halting_scores hold the score of every
           layer a token ran (0 after it halted: the masked graph computes a meaningless value
           there) and halting_mean is 0: it is a training-only quantity.
Large batches run in chunks of `chunk_size` images (default on CPU: 2^18 token floats per
chunk, 8 images of DeiT-T): XLA on CPU runs DeiT-T about 1.4x faster per image on chunks
of 8 than on a batch of 64, whose activations fall out of the caches.
Every mode runs in eval mode (dropout and drop path off); the
parameters are those of `model` when the function is made (`predict.set_params(model)` takes
new ones without recompiling). No training code is imported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avit_jax.models import halting as halting_lib
from avit_jax.models.avit import AViT, AViTOutput

MODES = ('dense', 'masked', 'compact')
PredictFn = Callable[[jax.Array], AViTOutput]


# Token states per chunk on CPU: 8 images of DeiT-T (8 * 197 * 192 ~ 2^18 floats), the
# measured sweet spot; a model with fewer tokens or a narrower width gets more images.
_CPU_CHUNK_FLOATS = 1 << 18


def default_chunk_size(model: AViT | None = None) -> int:
  """Images per chunk on CPU (cache-sized token states; 8 for DeiT-T, 4 for DeiT-S, 64 for
  the Fashion-MNIST default), 0 (whole batch) on accelerators."""
  if jax.default_backend() != 'cpu':
    return 0
  if model is None:
    return 8
  floats = (model.num_patches + 1) * model.cls_token.shape[-1]
  return 1 << max(0, round(math.log2(max(1.0, _CPU_CHUNK_FLOATS / floats))))


def _chunks(batch: int, chunk_size: int) -> int:
  """Number of equal chunks a batch runs in (1 when chunking is off or does not divide it)."""
  if chunk_size <= 0 or batch <= chunk_size or batch % chunk_size:
    return 1
  return batch // chunk_size


def _map_chunks(fn, images: jax.Array, chunk_size: int):
  """Applies fn to equal chunks of the batch with lax.map (one compiled body).

  Returns (outputs with chunks concatenated along axis 0, number of chunks).
  """
  n = _chunks(images.shape[0], chunk_size)
  if n == 1:
    return fn(images), 1
  stacked = jax.lax.map(fn, images.reshape(n, -1, *images.shape[1:]))
  return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stacked), n


# ---------------------------------------------------------------- dense and masked


def _dense(model, images, chunk_size):

  def one(x):
    return model.forward_head(model.forward_features(x))

  logits, _ = _map_chunks(one, images, chunk_size)
  b, n, depth = images.shape[0], model.num_patches + 1, model.depth
  full = jnp.full((b, n), float(depth), jnp.float32)
  return AViTOutput(logits=logits, token_depth=full, ponder=full,
                    halting_mean=jnp.zeros((depth,), jnp.float32),
                    halting_scores=jnp.zeros((b, depth, n), jnp.float32))


def _masked(model, images, chunk_size):
  out, n = _map_chunks(model, images, chunk_size)
  if n == 1:
    return out
  # lax.map stacked halting_mean [chunks, L] and the reshape above flattened it; chunks
  # are equal-sized, so the mean of chunk means is the mean over the batch.
  return dataclasses.replace(out, halting_mean=out.halting_mean.reshape(n, -1).mean(0))


# ---------------------------------------------------------------- compact


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Packed:
  """Running tokens of a chunk of B images, packed: T rows, image-major, original order.

  x: [T, D] token states. image: int32 [T] image index (B on padding rows).
  token: int32 [T] original token index. state: HaltingState with [T] fields, output [T, D].
  """
  x: jax.Array
  image: jax.Array
  token: jax.Array
  state: halting_lib.HaltingState


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Results:
  """Per image, original token layout: depth, ponder [B*N]; class [B, D]; scores [B*L*N]."""
  depth: jax.Array
  ponder: jax.Array
  class_output: jax.Array
  scores: jax.Array


def _segments(image: jax.Array, active: jax.Array, batch: int):
  """Per image: running-token count [B] and first row [B]; per row: position in its image."""
  counts = jax.ops.segment_sum(active.astype(jnp.int32), image, num_segments=batch)
  starts = jnp.cumsum(counts) - counts
  position = jnp.arange(image.shape[0]) - starts[jnp.minimum(image, batch - 1)]
  return counts, starts, position


def _embed_packed(model, images):
  """Embeds a chunk and packs every token: T = B * N rows, all running."""
  depth = model.depth
  x = model.embed(images)
  b, n, d = x.shape
  hs = halting_lib.init_state(b * n, 1, d)  # [B*N, 1] fields -> [B*N]
  hs = jax.tree.map(lambda a: a.reshape(b * n, *a.shape[2:]), hs)
  packed = _Packed(x=x.reshape(b * n, d), image=jnp.repeat(jnp.arange(b, dtype=jnp.int32), n),
                   token=jnp.tile(jnp.arange(n, dtype=jnp.int32), b), state=hs)
  zeros = jnp.zeros((b * n,), jnp.float32)
  results = _Results(depth=zeros, ponder=zeros,
                     class_output=jnp.zeros((b, d), jnp.float32),
                     scores=jnp.zeros((b * depth * n,), jnp.float32))
  return packed, results


def _compact_layer(block, halting_consts, depth, batch, n_pad, layer, packed: _Packed,
                   results: _Results):
  """One block on packed tokens + halting update + repacking of the still-running tokens.

  Returns (packed, results, stats) with packed still T rows, the running ones first, and
  stats int32 [2] = (running rows, longest image) for the host to pick the next buckets.
  """
  gamma, beta, eps, tokens = halting_consts
  x, image, hs = packed.x, packed.image, packed.state
  m = hs.mask
  real = m > 0
  counts, starts, position = _segments(image, real, batch)

  # Block, as vit.Block with a mask, on packed rows; attention per image on [B, n_pad].
  mx = m[:, None].astype(x.dtype)
  x = x * mx
  qkv = block.attn.qkv(block.norm1(x * mx) * mx)  # [T, 3D]
  slot = jnp.arange(n_pad)
  key_mask = slot[None, :] < counts[:, None]  # [B, n_pad]
  rows = jnp.minimum(starts[:, None] + slot[None, :], x.shape[0] - 1)
  padded = jnp.where(key_mask[..., None], qkv[rows], 0)  # gather: [B, n_pad, 3D]
  attended = block.attn.attend(padded, key_mask)
  attended = attended[jnp.minimum(image, batch - 1), jnp.clip(position, 0, n_pad - 1)]
  x = x + block.attn.proj(attended * mx)
  x = x + block.mlp(block.norm2(x * mx) * mx)

  # Halting, exactly as AViT.run_halting (h = 1 at the last layer).
  h = halting_lib.halting_score(x, gamma, beta)
  scores = h
  h = jnp.where(layer == depth - 1, jnp.ones_like(h), h)
  hs = halting_lib.update(hs, x, h, eps)

  # Record what the rows that ran this layer end with (a halted token keeps these).
  flat = jnp.where(real, image * tokens + packed.token, batch * tokens)
  depth_out = results.depth.at[flat].set(hs.depth, mode='drop')
  ponder_out = results.ponder.at[flat].set(hs.ponder, mode='drop')
  flat_scores = jnp.where(real, (image * depth + layer) * tokens + packed.token,
                          batch * depth * tokens)
  scores_out = results.scores.at[flat_scores].set(scores, mode='drop')
  # Class tokens: each image's first row while its class token runs.
  first = jnp.minimum(starts, x.shape[0] - 1)
  has_class = (counts > 0) & (packed.token[first] == 0)
  class_out = jnp.where(has_class[:, None], hs.output[first], results.class_output)

  # Repack: running rows first, stable (image-major, original order); the rest is padding.
  running = (hs.mask > 0) & real
  order = jnp.argsort(jnp.where(running, 0, 1), stable=True)
  running = running[order]
  hs = jax.tree.map(lambda a: a[order], hs)
  hs = dataclasses.replace(hs, mask=running.astype(jnp.float32))
  packed = _Packed(x=x[order], image=jnp.where(running, image[order], batch),
                   token=packed.token[order], state=hs)
  new_counts = jax.ops.segment_sum(running.astype(jnp.int32), packed.image, num_segments=batch)
  stats = jnp.stack([new_counts.sum(), new_counts.max()])
  results = _Results(depth=depth_out, ponder=ponder_out, class_output=class_out,
                     scores=scores_out)
  return packed, results, stats


def _finish(model, b, n, results: _Results):
  """Final norm and head on each image's class-token output; results back to [B, ...]."""
  features = model.norm(results.class_output[:, None, :].astype(model.dtype))
  depth = model.depth
  return AViTOutput(logits=model.forward_head(features),
                    token_depth=results.depth.reshape(b, n),
                    ponder=results.ponder.reshape(b, n),
                    halting_mean=jnp.zeros((depth,), jnp.float32),
                    halting_scores=results.scores.reshape(b, depth, n))


def _round_up(value: int, granule: int, limit: int) -> int:
  return min(limit, max(granule, -(-value // granule) * granule))


class _Params:
  """A module's parameters as a flat tuple of arrays; `merge` rebuilds it inside a trace.

  Jitted functions take the leaves, not the nnx graph or State: hashing a GraphDef as a
  static argument and flattening an nnx State cost milliseconds per call.
  """

  def __init__(self, module: nnx.Module):
    self.graphdef, state = nnx.split(module)
    self.leaves, self.treedef = jax.tree.flatten(state)

  def merge(self, leaves):
    return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


class Predictor:
  """predict(images) -> AViTOutput for 'dense' or 'masked'; one program per batch shape."""

  def __init__(self, model: AViT, mode: str, *, chunk_size: int):
    self.model = model
    params = _Params(model)
    fn = _dense if mode == 'dense' else _masked
    self._leaves = params.leaves
    self._jitted = jax.jit(lambda leaves, images: fn(params.merge(leaves), images, chunk_size))

  def set_params(self, model: AViT) -> None:
    """Takes the current parameters of `model` (same structure) without recompiling."""
    self._leaves = _Params(model).leaves

  def compiled_count(self) -> int:
    """Programs compiled so far (one per batch shape)."""
    return self._jitted._cache_size()  # pylint: disable=protected-access

  def __call__(self, images: jax.Array) -> AViTOutput:
    self.model.check_images(images)
    return self._jitted(self._leaves, images)


class CompactPredictor:
  """Token removal with packed token-wise layers and per-image attention (see module doc).

  token_buckets: the packed row count is rounded up to a multiple of B*N / token_buckets;
  query_buckets: the per-image attention length to a multiple of N / query_buckets (both to
  multiples of 8). Each block compiles once per (rows, length) pair: at most
  token_buckets * query_buckets programs per chunk size.
  """

  def __init__(self, model: AViT, *, chunk_size: int, token_buckets: int = 32,
               query_buckets: int = 8):
    if token_buckets < 1 or query_buckets < 1:
      raise ValueError(f'token_buckets and query_buckets must be >= 1, got {token_buckets}, '
                       f'{query_buckets}')
    self.model = model
    self.chunk_size = chunk_size
    self.token_buckets = token_buckets
    self.query_buckets = query_buckets
    self.tokens = n = model.num_patches + 1
    self.depth = depth = model.depth
    params = _Params(model)
    self._leaves = params.leaves
    blocks = [_Params(block) for block in model.blocks]
    # Blocks differ only in their drop-path rate, which eval mode ignores: one program
    # (block 0's graph with each block's parameters) serves every layer.
    if any(b.treedef != blocks[0].treedef for b in blocks):
      raise ValueError('compact inference needs blocks with identical parameter structure')
    self._block_leaves = [b.leaves for b in blocks]
    consts = (model.gate_scale, model.gate_center, model.eps, n)
    self._embed = jax.jit(lambda leaves, images: _embed_packed(params.merge(leaves), images))
    self._layer = jax.jit(
        lambda batch, n_pad, leaves, layer, packed, results: _compact_layer(
            blocks[0].merge(leaves), consts, depth, batch, n_pad, layer, packed, results),
        static_argnums=(0, 1), donate_argnums=(4, 5))
    self._take = jax.jit(lambda packed, rows: jax.tree.map(lambda a: a[:rows], packed),
                         static_argnums=(1,))
    self._finish = jax.jit(lambda leaves, results: _finish(
        params.merge(leaves), results.class_output.shape[0], n, results))

  def set_params(self, model: AViT) -> None:
    """Takes the current parameters of `model` (same structure) without recompiling."""
    self._leaves = _Params(model).leaves
    self._block_leaves = [_Params(block).leaves for block in model.blocks]

  def compiled_count(self) -> int:
    """Block programs compiled so far (one per chunk size and (rows, length) bucket pair)."""
    return self._layer._cache_size()  # pylint: disable=protected-access

  def granules(self, batch: int) -> tuple[int, int]:
    """Bucket sizes for a chunk of `batch` images: (packed rows, attention length)."""
    g_rows = _round_up(math.ceil(batch * self.tokens / self.token_buckets), 8, 1 << 30)
    g_len = _round_up(math.ceil(self.tokens / self.query_buckets), 8, 1 << 30)
    return g_rows, g_len

  def __call__(self, images: jax.Array) -> AViTOutput:
    self.model.check_images(images)
    b = images.shape[0]
    n_chunks = _chunks(b, self.chunk_size)
    chunk = b // n_chunks
    g_rows, g_len = self.granules(chunk)
    n = self.tokens
    # Chunks advance layer by layer together, so the device has the other chunks' work
    # queued while the host waits for one chunk's counts.
    live = []
    for c in range(n_chunks):
      packed, results = self._embed(self._leaves, images[c * chunk:(c + 1) * chunk])
      live.append([packed, results, _round_up(n, g_len, n)])
    for layer, leaves in enumerate(self._block_leaves):
      stats = []
      for item in live:
        packed, results, n_pad = item
        if packed is None:
          stats.append(None)
          continue
        item[0], item[1], s = self._layer(chunk, n_pad, leaves, np.int32(layer), packed, results)
        stats.append(s)
      for item, s in zip(live, stats):
        if s is None:
          continue
        rows, longest = (int(v) for v in np.asarray(s))
        if rows == 0:
          item[0] = None  # every token of this chunk halted
          continue
        item[0] = self._take(item[0], _round_up(rows, g_rows, chunk * n))
        item[2] = _round_up(longest, g_len, n)
    outs = [self._finish(self._leaves, item[1]) for item in live]
    if len(outs) == 1:
      return outs[0]
    return jax.tree.map(lambda *a: jnp.concatenate(a) if a[0].ndim > 1 else a[0], *outs)


def make_predict_fn(model: AViT, mode: str, *, chunk_size: int | None = None,
                    token_buckets: int = 32, query_buckets: int = 8) -> PredictFn:
  """Returns predict(images float32 [B, H, W, 3]) -> AViTOutput for `mode` (see MODES).

  chunk_size: images per chunk for large batches (None: `default_chunk_size(model)`; 0: off).
  token_buckets / query_buckets: bucket granularity of 'compact' (see CompactPredictor).
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  if not isinstance(model, AViT):
    raise TypeError(f'expected an avit_jax.models.AViT (models.create), got {type(model).__name__}')
  if mode != 'dense' and not model.halting:
    raise ValueError(f'mode {mode!r} needs a model with halting on (model.halting=True); '
                     "use mode='dense' for a DeiT")
  chunk_size = default_chunk_size(model) if chunk_size is None else int(chunk_size)
  # Eval mode without touching the caller's module: dropout / drop path off in a view that
  # shares the parameter arrays.
  view = nnx.view(model, deterministic=True)
  if mode == 'compact':
    return CompactPredictor(view, chunk_size=chunk_size, token_buckets=token_buckets,
                            query_buckets=query_buckets)
  return Predictor(view, mode, chunk_size=chunk_size)
