"""compact's packed layout (batches above 1): the running tokens of the whole batch as rows,
image after image, the images in decreasing order of running tokens. The block's first
half (norm1, the qkv projection, the attention core) runs per group of G images, on a
[G, n] layout of their states padded to the group's longest image; its second half (the
output projection and the MLP branch: three quarters of its weights) on the rows, in a loop of
fixed-size steps. A repack after each layer drops the halted rows and re-sorts the images
without moving the token states (an index map)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from avit_jax.inference.common import class_logits, removal_output, update_class_output
from avit_jax.inference.shapes import Plan, bucket_of
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
  """norm1, the qkv projection and the attention core of every image, group by group on
  [G, n] padded layouts.

  Gathers the states of each group's tokens from x [P, D] through `source` (the repack's
  index map) and writes each running token's attended values to its packed position of
  `out` [P, D]. The qkv projection runs here rather than on the rows: it then computes the
  padding slots too, but needs no [P, 3D] buffer and no gather of 3D-wide rows (measured on
  CPU: 2-3 % faster at batch 8 and 64, and less to compile). Groups come in decreasing
  length (the images are sorted), so the groups of each length bucket are a contiguous
  range: one loop per bucket over its range, each with a body of static shape.
  """
  group = plan.group
  total_rows = x.shape[0]
  group_lengths = bucket_of(layout.counts[::group], plan.lengths)

  def run_group(length, g, out):
    counts = jax.lax.dynamic_slice_in_dim(layout.counts, g * group, group)
    offsets = layout.firsts[g * group] + jnp.cumsum(counts) - counts
    position = jnp.arange(length)
    valid = position[None, :] < counts[:, None]
    # Padding slots re-read their image's first row: an image never reads another
    # image's rows (whose NaN would survive being masked).
    rows = offsets[:, None] + jnp.where(valid, position[None, :], 0)
    with jax.named_scope('layout'):
      grouped = x[source[rows]]
    attended = block.attn.attend(block.qkv(grouped), key_mask=valid)
    with jax.named_scope('layout'):
      return out.at[jnp.where(valid, rows, total_rows)].set(attended, mode='drop')

  with jax.named_scope('attention'):
    for length in plan.lengths:
      out = jax.lax.fori_loop(jnp.sum(group_lengths > length),
                              jnp.sum(group_lengths >= length),
                              functools.partial(run_group, length), out)
  return out


def _token_rows(fn, out, total, chunk: int):
  """out [P, ...] with its rows start .. start + size replaced by fn(out, start, size), for
  the first `total` rows (fn token-wise: those rows depend on those rows only).

  Whole steps of `chunk` rows (P a multiple of it), then the rest in steps of a quarter
  chunk: two compiled bodies, at most chunk / 4 - 1 rows computed in vain, which matters
  for small batches, whose layers hold a few hundred rows.
  """
  small = chunk // 4

  def steps(size, first):
    def step(i, out):
      start = first + i * size
      return jax.lax.dynamic_update_slice_in_dim(out, fn(out, start, size), start, axis=0)
    return step

  whole = total // chunk
  out = jax.lax.fori_loop(0, whole, steps(chunk, 0), out)
  return jax.lax.fori_loop(0, (total - whole * chunk + small - 1) // small,
                           steps(small, whole * chunk), out)


def _run_block(block, x, source, spare, layout: _Layout, plan: Plan):
  """vit.Block on the packed rows: norm1, the qkv projection and the attention core per
  group of images; the output projection and the MLP branch on the rows in steps of
  plan.chunk_rows. x [P, D] holds the last layer's states in its order, read through
  `source`; the outputs go into `spare` [P, D] (overwritten), which is returned."""
  total = jnp.sum(layout.counts)

  def states(start, size):
    return x[jax.lax.dynamic_slice_in_dim(source, start, size)]

  def output_and_mlp(attended, start, size):
    with jax.named_scope('attention'):
      y = block.attention_output(states(start, size),
                                 jax.lax.dynamic_slice_in_dim(attended, start, size))
    return block.mlp_branch(y)

  attended = _attention_groups(block, x, source, spare, layout, plan)
  return _token_rows(output_and_mlp, attended, total, plan.chunk_rows)


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


def forward(model, blocks, stacked, x, plan: Plan):
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
    y = _run_block(block, x, source, spare, layout, plan)
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
    # The old states' buffer receives the next layer's outputs (a new buffer per layer
    # would cost its zeroing).
    return y, x, source, rows, layout, results, class_output

  carry = (x, jnp.zeros_like(x), jnp.arange(total_rows, dtype=jnp.int32), rows, layout,
           results, jnp.zeros((b, d), jnp.float32))
  *_, (depths, ponders, scores), class_output = jax.lax.fori_loop(0, depth, run_layer, carry)
  return removal_output(model, class_logits(model, class_output), depths.reshape(b, n),
                        ponders.reshape(b, n), scores.reshape(b, depth, n))
