"""compact's packed layout (batches above 1): the running tokens of the whole batch as rows,
image after image, the images in decreasing order of running tokens. The block's attention
branch (`vit.Block.attention_branch`) runs per group of images (their number set per
length bucket), on a [G, n] layout of their states padded to the group's longest image; its
MLP branch (`vit.Block.mlp_branch`, two thirds of its weights) on the rows, in a loop of
fixed-size steps. A repack after each layer drops the halted rows and re-sorts the images
without moving the token states (an index map). Layers read and write the two halves of
one buffer in turn."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from avit_jax.inference.common import class_logits, removal_output, update_class_output
from avit_jax.inference.shapes import Plan
from avit_jax.models import halting as halting_lib


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
  """Images in row order, then empty slots up to B + the largest group (so that a group
  starting at any image fits): counts, images (B on slots) and the first row of each, all
  int32 [B']."""
  counts: jax.Array
  images: jax.Array
  firsts: jax.Array


def _layout(counts_by_image, slots: int) -> _Layout:
  """Sorts images by decreasing count (stable) and gives each its first row."""
  batch = counts_by_image.shape[0]
  order = jnp.argsort(-counts_by_image, stable=True).astype(jnp.int32)
  counts = jnp.pad(counts_by_image[order], (0, slots - batch))
  return _Layout(counts=counts, images=jnp.pad(order, (0, slots - batch), constant_values=batch),
                 firsts=jnp.cumsum(counts) - counts)


def group_starts(counts, lengths, groups):
  """The groups of the attention branch from images sorted by decreasing count: for each
  length bucket (longest first), its first image and number of groups.

  A bucket's groups, of groups[k] images each, start at the first image no earlier group
  holds and cover every image whose count needs that length; its last group fills up with
  the next images (shorter ones, padded to this length, or empty slots). Works on numpy
  and jax arrays alike (the benchmark's `work` mirrors the program with it).
  """
  xp = jnp if isinstance(counts, jax.Array) else np
  start, starts, numbers = 0, [], []
  for k in reversed(range(len(lengths))):
    needing = xp.sum(counts > (lengths[k - 1] if k else 0))  # images of this length or longer
    number = xp.maximum(0, -(-(needing - start) // groups[k]))
    starts.append(start)
    numbers.append(number)
    start = start + number * groups[k]
  return starts[::-1], numbers[::-1]


def _attention_groups(block, states, source, write, layout: _Layout, plan: Plan):
  """The block's attention branch, x + attention(norm1(x)), of every image, group by group
  on [G, n] padded layouts (G = plan.groups[k] images at length n = plan.lengths[k]).

  Gathers the states of each group's tokens from `states` [2P, D] through `source` (the
  repack's index map, into the half the last layer wrote) and writes each running token's
  output to its packed position in the other half, which starts at row `write`. The
  token-wise projections run here rather than on the rows: they then compute the padding
  slots too, but need no [P, 3D] qkv buffer, no gathers of 3D-wide rows and no second read
  of the states (measured on CPU: as fast or faster, as long to compile). The groups of
  each length are a contiguous range of the sorted images (`group_starts`): one loop per
  length, each with a body of static shape.
  """
  # Every image's indices at the full length, computed once per layer; each group's body
  # slices its images'. Padding slots re-read their image's first row: an image never
  # reads another image's rows (whose NaN would survive being masked); they write nowhere.
  with jax.named_scope('layout'):
    position = jnp.arange(plan.lengths[-1])
    valid = position < layout.counts[:, None]
    rows = layout.firsts[:, None] + jnp.where(valid, position, 0)
    reads, writes = source[rows], jnp.where(valid, write + rows, states.shape[0])
    starts, numbers = group_starts(layout.counts, plan.lengths, plan.groups)

  def run_group(length, group, first, g, states):
    take = lambda a: jax.lax.dynamic_slice(a, (first + g * group, 0), (group, length))  # noqa: E731
    with jax.named_scope('layout'):
      grouped = states[take(reads)]
    y = block.attention_branch(grouped, key_mask=take(valid))
    with jax.named_scope('layout'):
      return states.at[take(writes)].set(y, mode='drop')

  with jax.named_scope('attention'):
    for length, group, first, number in zip(plan.lengths, plan.groups, starts, numbers):
      states = jax.lax.fori_loop(0, number, functools.partial(run_group, length, group, first),
                                 states)
  return states


def _token_rows(fn, out, first, total, chunk: int):
  """out [R, ...] with its rows start .. start + size replaced by fn(out, start, size), for
  the `total` rows from row `first` on (fn token-wise: those rows depend on those rows only).

  Whole steps of `chunk` rows (R - first a multiple of it), then the rest in steps of a
  quarter chunk: two compiled bodies, at most chunk / 4 - 1 rows computed in vain, which
  matters for small batches, whose layers hold a few hundred rows.
  """
  small = chunk // 4

  def steps(size, offset):
    def step(i, out):
      start = offset + i * size
      return jax.lax.dynamic_update_slice_in_dim(out, fn(out, start, size), start, axis=0)
    return step

  whole = total // chunk
  out = jax.lax.fori_loop(0, whole, steps(chunk, first), out)
  return jax.lax.fori_loop(0, (total - whole * chunk + small - 1) // small,
                           steps(small, first + whole * chunk), out)


def _run_block(block, states, source, write, layout: _Layout, plan: Plan):
  """vit.Block on the packed rows: its attention branch per group of images, its MLP
  branch on the rows in steps of plan.chunk_rows. `states` [2P, D] holds the last layer's
  outputs in one half, in that layer's order, read through `source`; this layer's go to
  the other half, from row `write` on. Returns `states` so updated."""
  total = jnp.sum(layout.counts)

  def mlp(states, start, size):
    return block.mlp_branch(jax.lax.dynamic_slice_in_dim(states, start, size))

  states = _attention_groups(block, states, source, write, layout, plan)
  return _token_rows(mlp, states, write, total, plan.chunk_rows)


def _repack(rows: _Rows, batch: int, slots: int):
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
  layout = _layout(counts, slots)
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


def forward(model, blocks, stacked, x, plan: Plan):
  b, n, d = x.shape
  depth = model.depth
  slots = b + max(plan.groups)
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
  layout = _layout(jnp.full((b,), n, jnp.int32), slots)
  results = (jnp.zeros((b * n,), jnp.float32), jnp.zeros((b * n,), jnp.float32),
             jnp.zeros((b * depth * n,), jnp.float32))

  def run_layer(layer, carry):
    states, source, rows, layout, results, class_output = carry
    block = blocks.block(stacked, layer)
    # Layers alternate between the two halves of `states`: each reads the half the one
    # before wrote. One carried buffer updated in place; swapping two buffers between
    # loop iterations would make XLA copy both in every layer.
    read = (layer % 2) * total_rows
    write = total_rows - read
    states = _run_block(block, states, source + read, write, layout, plan)
    y = jax.lax.dynamic_slice_in_dim(states, write, total_rows)
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
      rows, source, layout = _repack(dataclasses.replace(rows, state=new), b, slots)
    return states, source, rows, layout, results, class_output

  carry = (jnp.concatenate([x, jnp.zeros_like(x)]), jnp.arange(total_rows, dtype=jnp.int32),
           rows, layout, results, jnp.zeros((b, d), jnp.float32))
  *_, (depths, ponders, scores), class_output = jax.lax.fori_loop(0, depth, run_layer, carry)
  return removal_output(model, class_logits(model, class_output), depths.reshape(b, n),
                        ponders.reshape(b, n), scores.reshape(b, depth, n))
