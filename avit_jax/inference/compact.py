"""'compact' mode: halted tokens removed for real, one compiled program per batch shape.

Everything runs on the device, in a loop over layers; each layer picks, from the running-
token counts the device itself computed, block programs of bucketed sizes (static shapes
compiled once). Two layouts:

* sequence (batch 1): [B, N] with each image's running tokens first, in their order; each
  layer runs `vit.Block` on the first n positions, n the longest image's count rounded up
  to a length bucket, the padding masked as keys. Nothing else: no grouping, no packing.
* packed (larger batches): the running tokens of the whole batch as rows, image after
  image, the images in decreasing order of running tokens. The block's attention branch
  runs per group of G consecutive images on a [G, n] layout padded to the group's longest
  image (similar counts, so little padding); its MLP branch, two thirds of the FLOPs, on
  the rows themselves, in a loop of fixed-size steps (no buckets). A repack after each
  layer drops the halted rows and re-sorts the images (cumulative sums, no sort over rows)
  without moving the token states: the next layer's attention reads them through the
  repack's index map.

In both, one halting step (`AViT.halting_step`) updates every row, only each image's class
token keeps the output accumulator (the head reads nothing else), and tokens keep running
until they halt themselves, also after their class token halted: the logits are final
then, but the other tokens' depths (and FLOPs) must be the masked model's.

A size is picked by a loop of 0 or 1 trips per bucket rather than lax.switch wherever the
buffers are large: on CPU a conditional copies every buffer it returns, which for the rows
of a batch of 64 costs more than the layer saves; a loop updates them in place.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avit_jax.inference.common import (ParamLeaves, class_logits, map_chunks, removal_output,
                                       update_class_output)
from avit_jax.models import halting as halting_lib
from avit_jax.models.avit import AViT, AViTOutput


def buckets(limit: int, granule: int) -> tuple[int, ...]:
  """granule, 2 * granule, ... up to and including `limit`."""
  return tuple(sorted({min(limit, k) for k in range(granule, limit + granule, granule)}))


def _granule(limit: int, count: int) -> int:
  """A step of about limit / count, rounded up to a multiple of 8 (matmul-friendly sizes)."""
  return max(8, math.ceil(limit / max(1, count) / 8) * 8)


def _bucket_of(count, sizes):
  """The smallest of `sizes` (sorted) that holds `count`; 0 when count is 0."""
  index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count.astype(jnp.int32))
  return jnp.where(count > 0, jnp.asarray(sizes, jnp.int32)[jnp.minimum(index, len(sizes) - 1)],
                   0)


def _select(bucket, sizes, make_fn, carry, *, copy_bytes: int = 1 << 20):
  """make_fn(size)(carry) for the size equal to `bucket` (carry unchanged for 0).

  A small carry goes through one lax.switch; a large one through a loop of 0 or 1 trips per
  size (`_run_if`), since a conditional copies every buffer it returns, which for the rows
  of a batch of 64 costs more than the layer saves.
  """
  nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(carry))
  if nbytes <= copy_bytes:
    index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), bucket)
    index = jnp.where(bucket > 0, index + 1, 0)
    return jax.lax.switch(index, [lambda c: c] + [make_fn(size) for size in sizes], carry)
  for size in sizes:
    carry = _run_if(bucket == size, make_fn(size), carry)
  return carry


def _run_if(condition, fn, carry):
  """fn(carry) if condition else carry, as a loop of 0 or 1 trips: unlike lax.cond, a loop
  updates its carry in place. fn must compute from its carry: XLA hoists work that only
  reads values from outside a loop out of it, and would run it whatever the condition."""

  return jax.lax.fori_loop(0, condition.astype(jnp.int32), lambda _, c: fn(c), carry)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static shape choices of one batch size (see `CompactPredictor.plan`)."""
  layout: str                   # 'sequence' or 'packed'
  lengths: tuple[int, ...]      # attention lengths (tokens per image) to pick from
  group: int = 1                # packed: images per attention group
  chunk_rows: int = 1           # packed: rows per step of the MLP branch's loop


def default_group(batch: int) -> int:
  """Images per attention group: 2 for small batches, whose images' counts differ a lot,
  up to 4 for 64 and more, where sorting makes neighbours alike (measured on CPU, DeiT-T:
  groups of 8 pad 13% of the attention rows at batch 64, groups of 4 10%)."""
  return min(4, max(2, batch // 16))


def default_row_chunk(model: AViT) -> int:
  """Rows per step of the MLP loop: on CPU about 2^18 token floats, at most 704 rows (704 rows
  of DeiT-T, 672 of DeiT-S): as fast per row as whole-batch matmuls, where steps of a
  quarter of that run 1.5x slower per row; 2048 on accelerators."""
  if jax.default_backend() != 'cpu':
    return 2048
  return min(704, max(128, round((1 << 18) / model.cls_token.shape[-1] / 32) * 32))


class CompactPredictor:
  """Token removal as one jitted program per batch shape, no read-back inside a forward.

  The bucket counts trade compile time (each size is a program of its own, compiled with
  the first batch) against padding (a count is rounded up to the next size):
  sequence_batch: batches up to this size use the sequence layout, larger ones the packed.
  length_buckets: number of attention lengths (multiples of 8, in steps of about N / it).
  group: images per attention group of the packed layout (None: `default_group(batch)`).
  row_chunk: rows per step of the packed layout's MLP loop at most (None:
    `default_row_chunk`; a quarter of the batch's tokens when that is fewer); a layer runs
    whole steps, then quarter steps, so it computes its running rows rounded up to a
    multiple of a quarter step.
  """

  def __init__(self, model: AViT, *, chunk_size: int, sequence_batch: int = 1,
               length_buckets: int = 12, group: int | None = None,
               row_chunk: int | None = None):
    self.model = model
    self.chunk_size = chunk_size
    self.tokens = n = model.num_tokens
    self.sequence_batch = sequence_batch
    self.length_buckets = length_buckets
    self.group = group
    self.row_chunk = row_chunk or default_row_chunk(model)
    if self.row_chunk % 4:
      raise ValueError(f'row_chunk must be a positive multiple of 4, got {row_chunk}')
    self._params = ParamLeaves(model)
    self._leaves = self._params.leaves
    self._blocks = _StackedBlocks(model.blocks)
    self._jitted = jax.jit(self._forward)

  def set_params(self, model: AViT) -> None:
    """Takes the current parameters of `model` (same structure) without recompiling."""
    self._leaves = ParamLeaves(model).leaves
    self._blocks.set_params(model.blocks)

  def compiled_count(self) -> int:
    """Programs compiled so far (one per batch shape)."""
    return self._jitted._cache_size()  # pylint: disable=protected-access

  def plan(self, batch: int) -> Plan:
    """The layout and bucket sizes used for batches of `batch` images."""
    n = self.tokens
    lengths = buckets(n, _granule(n, self.length_buckets))
    if batch <= self.sequence_batch:
      return Plan('sequence', lengths)
    group = min(batch, self.group or default_group(batch))
    # Small batches (or models) step by a quarter of their rows at most, so that the
    # rounding stays small against a layer's rows.
    chunk_rows = min(self.row_chunk, max(32, -(-batch * n // 128) * 32))
    return Plan('packed', lengths, group=group, chunk_rows=chunk_rows)

  def work(self, token_depth) -> dict:
    """What the program computes for halting with these token depths [B, N], layer by
    layer, against what the halting needs (numpy; no timing):

    rows_running / attention_running: running tokens, and the sum of their images'
    squared counts; rows_computed: token rows the MLP branch runs (the whole block in the
    sequence layout); attention_rows_computed / attention_computed: padded rows and
    sum of G * n^2 of the attention branch.
    """
    depth = np.asarray(token_depth)
    batch = depth.shape[0]
    plan = self.plan(batch)
    active = (depth[:, None, :] > np.arange(self.model.depth)[None, :, None]).sum(-1)
    fit = lambda count, sizes: 0 if count == 0 else next(s for s in sizes if s >= count)  # noqa: E731
    out = {k: [] for k in ('rows_running', 'attention_running', 'rows_computed',
                           'attention_rows_computed', 'attention_computed')}
    for counts in active.T:
      counts = np.sort(counts)[::-1]
      out['rows_running'].append(int(counts.sum()))
      out['attention_running'].append(int((counts.astype(np.int64) ** 2).sum()))
      if plan.layout == 'sequence':
        length = fit(counts[0], plan.lengths)
        lengths, size = [length] * batch, batch * length
      else:
        lengths = [fit(counts[g], plan.lengths) for g in range(0, batch, plan.group)]
        lengths = [n for n in lengths for _ in range(plan.group)]
        small = plan.chunk_rows // 4
        size = -(-int(counts.sum()) // small) * small
      out['rows_computed'].append(size)
      out['attention_rows_computed'].append(int(sum(lengths)))
      out['attention_computed'].append(int(sum(n * n for n in lengths)))
    return out

  def __call__(self, images: jax.Array) -> AViTOutput:
    self.model.check_images(images)
    return self._jitted(*self.arguments(images))

  @property
  def jitted(self):
    """The jax.jit forward, called as jitted(*arguments(images)) (e.g. for jax.export)."""
    return self._jitted

  def arguments(self, images) -> tuple:
    return self._leaves, self._blocks.stacked, images

  def _forward(self, leaves, stacked, images):
    model = self._params.merge(leaves)
    x, _ = map_chunks(model.embed, images, self.chunk_size or images.shape[0])
    plan = self.plan(x.shape[0])
    if plan.layout == 'sequence':
      return _sequence_forward(model, self._blocks, stacked, x, plan)
    return _packed_forward(model, self._blocks, stacked, x, plan)


class _StackedBlocks:
  """The blocks' parameters stacked on a leading layer axis, for a loop over layers.

  Blocks differ only in their drop-path rate, which eval mode ignores, so block 0's graph
  with layer l's parameters is block l.
  """

  def __init__(self, blocks):
    self.graphdef, _, self.rest = nnx.split(blocks[0], nnx.Param, ...)
    self.set_params(blocks)

  def set_params(self, blocks) -> None:
    states = [nnx.split(block, nnx.Param, ...)[1] for block in blocks]
    if any(jax.tree.structure(s) != jax.tree.structure(states[0]) for s in states):
      raise ValueError('compact inference needs blocks with identical parameter structure')
    self.stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)

  def block(self, stacked, layer):
    params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False),
                          stacked)
    return nnx.merge(self.graphdef, params, self.rest)


# ---------------------------------------------------------------------------------------
# Sequence layout: [B, N], each image's running tokens first.


def _running_first(running):
  """Per row of running [B, N] (bool): the permutation that puts running tokens first,
  each group in its original order. Returns source indices [B, N] (int32)."""
  b, n = running.shape
  before_running = jnp.cumsum(running, axis=1) - 1
  before_halted = jnp.cumsum(~running, axis=1) - 1 + jnp.sum(running, axis=1, keepdims=True)
  dest = jnp.where(running, before_running, before_halted)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
  return jnp.zeros((b, n), jnp.int32).at[rows, dest].set(
      jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), unique_indices=True)


def _sequence_forward(model, blocks, stacked, x, plan: Plan):
  b, n, d = x.shape
  depth = model.depth
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))

  def run_layer(layer, carry):
    x, state, token, scores, class_output = carry
    block = blocks.block(stacked, layer)
    mask = state.mask
    bucket = _bucket_of(jnp.max(jnp.sum(mask, axis=1)), plan.lengths)

    def run(length):
      def fn(x):
        out = block(x[:, :length], key_mask=mask[:, :length] > 0)
        return jax.lax.dynamic_update_slice_in_dim(x, out, 0, axis=1)
      return fn

    y = _select(bucket, plan.lengths, run, x)
    new, weight, score = model.halting_step(state, y, layer)
    with jax.named_scope('halting'):
      ran = mask > 0
      scores = scores.at[rows, layer, token].set(jnp.where(ran, score, 0.0))
      class_output = update_class_output(class_output, (token[:, 0] == 0) & ran[:, 0],
                                         y[:, 0], weight[:, 0])

    def compact(carry):
      y, new, token = carry
      source = _running_first(new.mask > 0)
      take = lambda a: jnp.take_along_axis(  # noqa: E731
          a, source.reshape(source.shape + (1,) * (a.ndim - 2)), axis=1)
      return take(y), jax.tree.map(take, new), take(token)

    # Nothing to move in the layers where no token halted (the first ones, mostly).
    with jax.named_scope('repack'):
      y, new, token = _run_if(jnp.any(new.mask != mask), compact, (y, new, token))
    return y, new, token, scores, class_output

  carry = (x, halting_lib.init_state((b, n)), jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32),
                                                                  (b, n)),
           jnp.zeros((b, depth, n), jnp.float32), jnp.zeros((b, d), jnp.float32))
  _, state, token, scores, class_output = jax.lax.fori_loop(0, depth, run_layer, carry)
  restore = lambda a: jnp.zeros_like(a).at[rows, token].set(a, unique_indices=True)  # noqa: E731
  return removal_output(model, class_logits(model, class_output), restore(state.depth),
                        restore(state.ponder), scores)


# ---------------------------------------------------------------------------------------
# Packed layout: the running tokens of the batch as rows.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Rows:
  """The bookkeeping of the batch's token rows (R = B*N, rounded up to whole MLP steps).

  The running tokens come first, image after image (images in decreasing order of
  running tokens, ties by index), each image's tokens in their original order, so its
  class token, while it runs, is its first row. image = B on rows that hold no token.
  """
  image: jax.Array      # [R] int32
  token: jax.Array      # [R] int32
  state: halting_lib.HaltingState  # [R]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Layout:
  """Images in row order, padded to whole groups: counts, images (B on padding) and the
  first row of each, all int32 [B']."""
  counts: jax.Array
  images: jax.Array
  firsts: jax.Array


def _layout(counts_by_image, groups: int, group: int) -> _Layout:
  """Sorts images by decreasing count (stable) and gives each its first row."""
  batch = counts_by_image.shape[0]
  order = jnp.argsort(-counts_by_image, stable=True).astype(jnp.int32)
  counts = counts_by_image[order]
  pad = groups * group - batch
  counts = jnp.pad(counts, (0, pad))
  return _Layout(counts=counts, images=jnp.pad(order, (0, pad), constant_values=batch),
                 firsts=jnp.cumsum(counts) - counts)


def _attention_groups(block, x, source, out, layout: _Layout, plan: Plan):
  """The attention branch of every image, group by group on [G, n] padded layouts.

  Reads the token states x [P, D] through `source` (packed position -> row of x) and writes
  each running token's attention-branch output to its packed position of `out` [P, D].
  Groups come in decreasing length (the images are sorted), so the groups of each length
  bucket are a contiguous range: one loop per bucket over its range, each with a body of
  static shape.
  """
  group = plan.group
  total_rows = x.shape[0]
  group_lengths = _bucket_of(layout.counts[::group], plan.lengths)

  def run_group(length, g, out):
    counts = jax.lax.dynamic_slice_in_dim(layout.counts, g * group, group)
    offsets = layout.firsts[g * group] + jnp.cumsum(counts) - counts
    position = jnp.arange(length)
    valid = position[None, :] < counts[:, None]
    # Padding slots re-read their image's first row: an image never reads another
    # image's rows (whose NaN would survive being masked).
    rows = offsets[:, None] + jnp.where(valid, position[None, :], 0)
    y = block.attention_branch(x[source[rows]], key_mask=valid)
    return out.at[jnp.where(valid, rows, total_rows)].set(y, mode='drop')

  for length in plan.lengths:
    out = jax.lax.fori_loop(jnp.sum(group_lengths > length), jnp.sum(group_lengths >= length),
                            functools.partial(run_group, length), out)
  return out


def _token_rows(fn, x, total, chunk: int):
  """x [P, D] with its first `total` rows replaced by fn of them (a token-wise function).

  Whole steps of `chunk` rows (P a multiple of it), then the rest in steps of a quarter
  chunk: two compiled bodies, at most chunk / 4 - 1 rows computed in vain, which matters
  for small batches, whose layers hold a few hundred rows.
  """
  small = chunk // 4

  def steps(size, first):
    def step(i, x):
      start = first + i * size
      rows = jax.lax.dynamic_slice_in_dim(x, start, size)
      return jax.lax.dynamic_update_slice_in_dim(x, fn(rows), start, axis=0)
    return step

  whole = total // chunk
  x = jax.lax.fori_loop(0, whole, steps(chunk, 0), x)
  return jax.lax.fori_loop(0, (total - whole * chunk + small - 1) // small,
                           steps(small, whole * chunk), x)


def _repack(rows: _Rows, batch: int, groups: int, group: int):
  """Running rows to the front, image after image in decreasing order of running tokens.

  Returns (rows, source, layout): the rows' bookkeeping in the new order, and for each new
  position the old one (`source`), through which the next layer reads the token states
  instead of moving them. A running row's place in its image is the number of running rows
  before it, minus those before its image's first running row (an image's rows are
  contiguous), so this is cumulative sums and one gather, no sort over rows.
  """
  total_rows = rows.image.shape[0]
  running = (rows.state.mask > 0) & (rows.image < batch)
  image = jnp.minimum(rows.image, batch)
  counts = jax.ops.segment_sum(running.astype(jnp.int32), image, num_segments=batch + 1)[:batch]
  layout = _layout(counts, groups, group)
  first_by_image = jnp.zeros((batch + 1,), jnp.int32).at[layout.images].set(layout.firsts,
                                                                              mode='drop')
  before = jnp.cumsum(running) - running
  image_before = jax.ops.segment_min(jnp.where(running, before, total_rows), image,
                                     num_segments=batch + 1)
  dest = jnp.where(running, first_by_image[image] + before - image_before[image], total_rows)
  source = jnp.zeros((total_rows,), jnp.int32).at[dest].set(
      jnp.arange(total_rows, dtype=jnp.int32), mode='drop')
  valid = jnp.zeros((total_rows,), bool).at[dest].set(True, mode='drop')
  moved = jax.tree.map(lambda a: a[source], rows)
  state = dataclasses.replace(moved.state, mask=valid.astype(jnp.float32))
  return dataclasses.replace(moved, image=jnp.where(valid, moved.image, batch),
                             state=state), source, layout


def _packed_forward(model, blocks, stacked, x, plan: Plan):
  b, n, d = x.shape
  depth = model.depth
  group = plan.group
  groups = -(-b // group)
  chunk = plan.chunk_rows
  # P rows: every token, rounded up to whole MLP steps; rows past B*N never hold a token.
  total_rows = -(-b * n // chunk) * chunk
  pad = total_rows - b * n
  rows = _Rows(image=jnp.pad(jnp.repeat(jnp.arange(b, dtype=jnp.int32), n), (0, pad),
                             constant_values=b),
               token=jnp.pad(jnp.tile(jnp.arange(n, dtype=jnp.int32), b), (0, pad)),
               state=jax.tree.map(lambda a: jnp.pad(a, (0, pad)),
                                  halting_lib.init_state((b * n,))))
  x = jnp.pad(x.reshape(b * n, d), ((0, pad), (0, 0)))
  layout = _layout(jnp.full((b,), n, jnp.int32), groups, group)
  results = (jnp.zeros((b * n,), jnp.float32), jnp.zeros((b * n,), jnp.float32),
             jnp.zeros((b * depth * n,), jnp.float32))

  def run_layer(layer, carry):
    x, spare, source, rows, layout, results, class_output = carry
    block = blocks.block(stacked, layer)
    # vit.Block in its two branches: attention per group of images (reading x in the last
    # layer's order through `source`), the MLP on the packed rows of its output.
    with jax.named_scope('layout'):  # the gathers around the block's attention branch
      y = _attention_groups(block, x, source, spare, layout, plan)
    y = _token_rows(block.mlp_branch, y, jnp.sum(layout.counts), chunk)
    new, weight, score = model.halting_step(rows.state, y, layer)
    with jax.named_scope('halting'):
      ran = rows.state.mask > 0
      flat = jnp.where(ran, rows.image * n + rows.token, b * n)
      flat_scores = jnp.where(ran, (rows.image * depth + layer) * n + rows.token, b * depth * n)
      depths, ponders, scores = results
      results = (depths.at[flat].set(new.depth, mode='drop'),
                 ponders.at[flat].set(new.ponder, mode='drop'),
                 scores.at[flat_scores].set(score, mode='drop'))
      # Each image's class token is its first row while it runs.
      first = jnp.minimum(layout.firsts, total_rows - 1)
      is_class = (layout.counts > 0) & (rows.token[first] == 0)
      image = jnp.minimum(layout.images, b - 1)
      updated = update_class_output(class_output[image], is_class, y[first], weight[first])
      class_output = class_output.at[jnp.where(is_class, layout.images, b)].set(updated,
                                                                                mode='drop')
    with jax.named_scope('repack'):
      rows, source, layout = _repack(dataclasses.replace(rows, state=new), b, groups, group)
    # The old states' buffer receives the next layer's outputs (no new buffer per layer).
    return y, x, source, rows, layout, results, class_output

  carry = (x, jnp.zeros_like(x), jnp.arange(total_rows, dtype=jnp.int32), rows, layout,
           results, jnp.zeros((b, d), jnp.float32))
  *_, (depths, ponders, scores), class_output = jax.lax.fori_loop(0, depth, run_layer, carry)
  return removal_output(model, class_logits(model, class_output), depths.reshape(b, n),
                        ponders.reshape(b, n), scores.reshape(b, depth, n))
