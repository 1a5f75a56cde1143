"""'compact' mode: halted tokens removed for real (see the package doc for the design).

The running tokens of the batch live in packed rows (`_Rows`); each block runs per group of
images of similar running-token counts (`_group_block`); `_repack` drops the halted rows
and re-sorts the images after every layer; `CompactPredictor` drives it from the host.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from avit_jax.inference.common import (Params, Results, finish, map_chunks,
                                       update_class_output)
from avit_jax.models import halting as halting_lib
from avit_jax.models.avit import AViT, AViTOutput


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Rows:
  """Token rows of the whole batch: R = B*N + G*N rows (G*N of slack, so that a group's
  bucket-sized window never runs past the end).

  After every repack the running tokens come first, packed image by image with the images
  in decreasing order of running tokens (ties by image index) and each image's tokens in
  their original order (so its class token, while it runs, is its first row); the other
  rows have image = B. Fields, all [R]: x [R, D]; image, token int32; cumulative,
  remainder, ponder, depth: the halting state; mask: 1 on running rows (after a block:
  still running); score: the halting score of the last layer the row ran.
  """
  x: jax.Array
  image: jax.Array
  token: jax.Array
  cumulative: jax.Array
  remainder: jax.Array
  ponder: jax.Array
  depth: jax.Array
  mask: jax.Array
  score: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Layout:
  """Images in row order (decreasing running count), padded to whole groups of G:
  counts int32 [B'] running tokens, images int32 [B'] image index (B on padding)."""
  counts: jax.Array
  images: jax.Array


def _embed_rows(model, images, group):
  """Embeds the batch into rows (all running, image-major) and the starting layout.

  The patch embedding runs in chunks of `group` images, like dense's (cache-sized)."""
  x, _ = map_chunks(model.embed, images, group)
  b, n, d = x.shape
  padded_batch = -(-b // group) * group
  total = b * n + group * n
  pad = lambda a, value: jnp.pad(a, (0, total - b * n), constant_values=value)  # noqa: E731
  zeros, ones = jnp.zeros((b * n,), jnp.float32), jnp.ones((b * n,), jnp.float32)
  rows = _Rows(
      x=jnp.pad(x.reshape(b * n, d), ((0, total - b * n), (0, 0))),
      image=pad(jnp.repeat(jnp.arange(b, dtype=jnp.int32), n), b),
      token=pad(jnp.tile(jnp.arange(n, dtype=jnp.int32), b), 0),
      cumulative=pad(zeros, 0.0), remainder=pad(ones, 1.0), ponder=pad(zeros, 0.0),
      depth=pad(ones, 1.0), mask=pad(ones, 0.0), score=pad(zeros, 0.0))
  layout = _Layout(
      counts=jnp.pad(jnp.full((b,), n, jnp.int32), (0, padded_batch - b)),
      images=jnp.pad(jnp.arange(b, dtype=jnp.int32), (0, padded_batch - b), constant_values=b))
  results = Results(depth=zeros, ponder=zeros,
                    scores=jnp.zeros((b * model.depth * n,), jnp.float32),
                    class_output=jnp.zeros((b, d), jnp.float32))
  return rows, layout, results


def _group_block(block, halting_consts, depth, group, window, n_pad, layer, first_image,
                 rows: _Rows, layout: _Layout, class_output):
  """One block + halting update for the G images of the layout from `first_image` on.

  Works on a window of `window` rows from the group's first row (its running tokens, then
  rows of other groups, which are left untouched); attention runs per image on a
  [G, n_pad] layout with the padding masked as keys, exactly like a halted token. Returns
  (rows, class_output) with the group's rows and class-token outputs updated.
  """
  gamma, beta, eps = halting_consts
  batch = class_output.shape[0]
  counts = jax.lax.dynamic_slice_in_dim(layout.counts, first_image, group)
  images = jax.lax.dynamic_slice_in_dim(layout.images, first_image, group)
  start = jnp.sum(jnp.where(jnp.arange(layout.counts.shape[0]) < first_image, layout.counts, 0))
  part = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, window), rows)
  ends = jnp.cumsum(counts)
  firsts = ends - counts
  i = jnp.arange(window)
  real = i < ends[-1]
  slot = jnp.minimum(jnp.sum(i[:, None] >= ends[None, :], axis=1), group - 1)
  position = jnp.clip(i - firsts[slot], 0, n_pad - 1)

  # vit.Block with a mask, on the window's rows; attention per image on [G, n_pad]. The
  # mask multiplies of vit.Block are left out: on the group's rows they are 1 (x * 1 is x),
  # token-wise ops keep rows apart, and the other rows' results are dropped below.
  mask = real.astype(jnp.float32)
  x = part.x
  qkv = block.attn.qkv(block.norm1(x))
  key_mask = jnp.arange(n_pad)[None, :] < counts[:, None]
  # Padding slots repeat the image's own first row: they get zero weight as keys, and an
  # image never reads another image's rows (whose NaN would survive 0 * NaN).
  gather = firsts[:, None] + jnp.where(key_mask, jnp.arange(n_pad)[None, :], 0)
  padded = jnp.take(qkv, gather.reshape(-1), axis=0, mode='clip').reshape(group, n_pad, -1)
  attended = block.attn.attend(padded, key_mask)
  # Back to rows: a row gather with sorted indices (XLA on CPU copies whole rows).
  x = x + block.attn.proj(jnp.take(attended.reshape(group * n_pad, -1), slot * n_pad + position,
                                   axis=0, mode='clip', indices_are_sorted=True))
  x = x + block.mlp(block.norm2(x))

  # Halting, exactly as AViT.run_halting (h = 1 at the last layer). Only class tokens need
  # the output accumulator: it is updated for the group's class rows alone.
  score = halting_lib.halting_score(x, gamma, beta)
  h = jnp.where(layer == depth - 1, jnp.ones_like(score), score)
  state = halting_lib.HaltingState(
      cumulative=part.cumulative, remainder=part.remainder, mask=mask, ponder=part.ponder,
      depth=part.depth, output=jnp.zeros((window, 1), jnp.float32))
  new = halting_lib.update(state, x, h, eps)
  first = jnp.minimum(firsts, window - 1)
  is_class = (counts > 0) & (part.token[first] == 0)
  updated_class = update_class_output(state, first, is_class, x, h,
                                      class_output[jnp.minimum(images, batch - 1)], eps)
  class_output = class_output.at[jnp.where(is_class, images, batch)].set(updated_class,
                                                                        mode='drop')

  keep = lambda new, old: jnp.where(real.reshape(-1, *[1] * (old.ndim - 1)), new, old)  # noqa: E731
  updated = dataclasses.replace(
      part, x=keep(x, part.x), cumulative=keep(new.cumulative, part.cumulative),
      remainder=keep(new.remainder, part.remainder), ponder=keep(new.ponder, part.ponder),
      depth=keep(new.depth, part.depth), mask=keep(new.mask, part.mask),
      score=keep(score, part.score))
  rows = jax.tree.map(lambda a, u: jax.lax.dynamic_update_slice_in_dim(a, u, start, 0),
                      rows, updated)
  return rows, class_output


def _repack(depth, tokens, group, prefix, layer, rows: _Rows, results: Results):
  """Records what the rows that ran this layer end with, then packs the still-running rows
  to the front, images in decreasing order of running tokens. `prefix` (static) covers
  every row that ran. Returns (rows, layout, results)."""
  batch = results.class_output.shape[0]
  p = jax.tree.map(lambda a: a[:prefix], rows)
  ran = p.image < batch
  image = jnp.minimum(p.image, batch)
  flat = jnp.where(ran, image * tokens + p.token, batch * tokens)
  flat_scores = jnp.where(ran, (image * depth + layer) * tokens + p.token, batch * depth * tokens)
  results = dataclasses.replace(
      results, depth=results.depth.at[flat].set(p.depth, mode='drop'),
      ponder=results.ponder.at[flat].set(p.ponder, mode='drop'),
      scores=results.scores.at[flat_scores].set(p.score, mode='drop'))

  running = ran & (p.mask > 0)
  counts = jax.ops.segment_sum(running.astype(jnp.int32), image, num_segments=batch + 1)[:batch]
  order = jnp.argsort(-counts, stable=True).astype(jnp.int32)
  sorted_counts = counts[order]
  new_first = jnp.zeros((batch,), jnp.int32).at[order].set(jnp.cumsum(sorted_counts)
                                                           - sorted_counts)
  # A running row's place in its image: running rows before it, minus those before the
  # image's first running row (an image's rows are contiguous).
  before = jnp.cumsum(running) - running
  image_before = jax.ops.segment_min(jnp.where(running, before, prefix), image,
                                     num_segments=batch + 1)
  dest = jnp.where(running, new_first[jnp.minimum(image, batch - 1)] + before
                   - image_before[image], prefix)
  source = jnp.zeros((prefix,), jnp.int32).at[dest].set(jnp.arange(prefix, dtype=jnp.int32),
                                                        mode='drop')
  valid = jnp.zeros((prefix,), bool).at[dest].set(True, mode='drop')
  q = jax.tree.map(lambda a: a[source], p)
  q = dataclasses.replace(q, image=jnp.where(valid, q.image, batch),
                          mask=valid.astype(jnp.float32))
  rows = jax.tree.map(lambda a, u: jax.lax.dynamic_update_slice_in_dim(a, u, 0, 0), rows, q)
  padded = -(-batch // group) * group - batch
  layout = _Layout(counts=jnp.pad(sorted_counts, (0, padded)),
                   images=jnp.pad(order, (0, padded), constant_values=batch))
  return rows, layout, results


def _round_up(value: int, granule: int, limit: int) -> int:
  return min(limit, max(granule, -(-value // granule) * granule))


class CompactPredictor:
  """Token removal: token-wise layers on packed rows, attention per image (see module doc).

  The batch runs as one set of rows; each block runs group by group, a group being
  `chunk_size` images of similar running-token counts (images are re-sorted by count after
  every layer, so attention pads little). token_buckets: a group's row window is rounded up
  to a multiple of G*N / token_buckets; query_buckets: its attention length to a multiple
  of N / query_buckets (both to multiples of 8). The block compiles once per (window,
  length) pair, at most token_buckets * query_buckets programs per group size; the repack
  between layers once per row bucket. The counts are read back to the host after each layer.
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
    params = Params(model)
    self._leaves = params.leaves
    blocks = [Params(block) for block in model.blocks]
    # Blocks differ only in their drop-path rate, which eval mode ignores: one program
    # (block 0's graph with each block's parameters) serves every layer.
    if any(b.treedef != blocks[0].treedef for b in blocks):
      raise ValueError('compact inference needs blocks with identical parameter structure')
    self._block_leaves = [b.leaves for b in blocks]
    consts = (model.gate_scale, model.gate_center, model.eps)
    self._embed = jax.jit(
        lambda leaves, images, group: _embed_rows(params.merge(leaves), images, group),
        static_argnums=(2,))
    self._group = jax.jit(
        lambda group, window, n_pad, leaves, layer, first, rows, layout, class_output:
        _group_block(blocks[0].merge(leaves), consts, depth, group, window, n_pad, layer,
                     first, rows, layout, class_output),
        static_argnums=(0, 1, 2), donate_argnums=(6, 8))
    self._repack = jax.jit(
        lambda group, prefix, layer, rows, results: _repack(depth, n, group, prefix, layer,
                                                            rows, results),
        static_argnums=(0, 1), donate_argnums=(3, 4))
    self._finish = jax.jit(lambda leaves, results: finish(
        params.merge(leaves), results.class_output.shape[0], n, results))

  def set_params(self, model: AViT) -> None:
    """Takes the current parameters of `model` (same structure) without recompiling."""
    self._leaves = Params(model).leaves
    self._block_leaves = [Params(block).leaves for block in model.blocks]

  def compiled_count(self) -> int:
    """Block programs compiled so far (one per group size and (window, length) pair)."""
    return self._group._cache_size()  # pylint: disable=protected-access

  def group_size(self, batch: int) -> int:
    """Images per group for a batch: chunk_size (the whole batch when 0 or larger)."""
    return batch if self.chunk_size <= 0 else min(self.chunk_size, batch)

  def granules(self, group: int) -> tuple[int, int]:
    """Bucket sizes for groups of `group` images: (row window, attention length)."""
    g_rows = _round_up(math.ceil(group * self.tokens / self.token_buckets), 8, 1 << 30)
    g_len = _round_up(math.ceil(self.tokens / self.query_buckets), 8, 1 << 30)
    return g_rows, g_len

  def __call__(self, images: jax.Array) -> AViTOutput:
    return self._run(images, None)

  def profile(self, images: jax.Array) -> dict:
    """One run with the device synchronised after every call: where compact's time goes.

    Returns {'seconds': {embed, blocks, repack, finish}, 'block_calls', 'rows_computed' /
    'rows_running' (token rows the blocks ran, with bucket rounding / needed),
    'attention_computed' / 'attention_running' (sum of G * n^2 over the groups' padded
    attention / sum of each image's running tokens squared)}.
    """
    stats = dict(seconds=dict(embed=0.0, blocks=0.0, repack=0.0, finish=0.0), block_calls=0,
                 rows_computed=0, rows_running=0, attention_computed=0, attention_running=0)
    self._run(images, stats)
    return stats

  def _run(self, images: jax.Array, stats: dict | None) -> AViTOutput:
    self.model.check_images(images)

    def call(phase, fn, *args):
      if stats is None:
        return fn(*args)
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*args))
      stats['seconds'][phase] += time.perf_counter() - start
      return out

    b, n = images.shape[0], self.tokens
    group = self.group_size(b)
    g_rows, g_len = self.granules(group)
    g_prefix, _ = self.granules(b)
    rows, layout, results = call('embed', self._embed, self._leaves, images, group)
    class_output = results.class_output
    counts = np.zeros(layout.counts.shape[0], np.int64)
    counts[:b] = n
    for layer, leaves in enumerate(self._block_leaves):
      total = int(counts.sum())
      if total == 0:
        break  # every token halted
      for first in range(0, len(counts), group):
        in_group = counts[first:first + group]
        if not in_group[0]:
          break  # images come in decreasing count: the remaining groups are empty
        window = _round_up(int(in_group.sum()), g_rows, group * n)
        n_pad = _round_up(int(in_group[0]), g_len, n)
        rows, class_output = call('blocks', self._group, group, window, n_pad, leaves,
                                  np.int32(layer), np.int32(first), rows, layout, class_output)
        if stats is not None:
          stats['block_calls'] += 1
          stats['rows_computed'] += window
          stats['rows_running'] += int(in_group.sum())
          stats['attention_computed'] += group * n_pad ** 2
          stats['attention_running'] += int((in_group ** 2).sum())
      results = dataclasses.replace(results, class_output=class_output)
      rows, layout, results = call('repack', self._repack, group,
                                   _round_up(total, g_prefix, b * n), np.int32(layer), rows,
                                   results)
      class_output = results.class_output
      counts = np.asarray(layout.counts)
    return call('finish', self._finish, self._leaves, results)
