"""compact's packed layout (batches above 1): the running tokens of the whole batch as rows,
image after image, the images in decreasing order of running tokens. The attention branch
(`vit.Block.attention_branch`) runs per group of images on a [G, n] layout of their states
padded to the group's longest image; the MLP branch (`vit.Block.mlp_branch`) on the rows, in
a loop of fixed-size steps. A repack after each layer drops the halted rows and re-sorts the
images without moving the token states (the next layer reads them through an index map)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from avit_jax.inference.common import block_at, removal_output, update_special_outputs
from avit_jax.models import halting as halting_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Rows:
  """The batch's token rows (R = B*N rounded up to whole MLP steps): running tokens
  first, image after image (decreasing running count, ties by index), each image's in
  their original order, so its special tokens, while they run, are its first rows. image =
  B on rows that hold no token."""
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
  """For each length bucket, the first image and the number of its attention groups, the
  images sorted by decreasing count: a bucket's groups of groups[k] images start at the
  first image no longer bucket's groups hold and cover every image that needs this length
  (the last group filled up with shorter images or empty slots). numpy or jax arrays."""
  xp = jnp if isinstance(counts, jax.Array) else np
  start, starts, numbers = 0, [], []
  for k in reversed(range(len(lengths))):
    needing = xp.sum(counts > (lengths[k - 1] if k else 0))  # images of this length or longer
    number = xp.maximum(0, -(-(needing - start) // groups[k]))
    starts.append(start)
    numbers.append(number)
    start = start + number * groups[k]
  return starts[::-1], numbers[::-1]


def _attention_groups(block, states, source, write, layout: _Layout, plan):
  """The attention branch of every image, group by group on [G, n] padded layouts (G =
  plan.groups[k] images at length n = plan.lengths[k]). Gathers the states of each group's tokens from `states` [2P, D] through `source` (the
  repack's index map, into the half the last layer wrote) and writes each running token's
  output to its packed position in the other half, which starts at row `write`. The qkv
  and output projections run here on the padded layout rather than on the rows: that
  computes the padding slots too, but needs no [P, 3D] qkv buffer and no gathers of
  3D-wide rows. The groups of each length are a contiguous range of the sorted images
  (`group_starts`): one loop per length, each with a body of static shape.
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


def _mlp_rows(block, states, first, total, chunk: int):
  """The MLP branch (token-wise) on the `total` rows of `states` from row `first` on: whole
  steps of `chunk` rows, then the rest in quarter steps, so a layer computes at most a
  quarter step of rows in vain (which matters for small batches) with two loop bodies."""
  small = chunk // 4

  def steps(size, offset):
    def step(i, out):
      start = offset + i * size
      y = block.mlp_branch(jax.lax.dynamic_slice_in_dim(out, start, size))
      return jax.lax.dynamic_update_slice_in_dim(out, y, start, axis=0)
    return step

  whole = total // chunk
  states = jax.lax.fori_loop(0, whole, steps(chunk, first), states)
  return jax.lax.fori_loop(0, (total - whole * chunk + small - 1) // small,
                           steps(small, first + whole * chunk), states)


def _repack(rows: _Rows, batch: int, slots: int):
  """Running rows to the front, image after image in decreasing order of running tokens:
  (rows in the new order, `source` = each new row's old position, through which the next
  layer reads the token states instead of moving them, layout). A running row's place in
  its image is the number of running rows before it less those before its image's first:
  cumulative sums and one gather, no sort over rows."""
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


def forward(model, x, plan):
  b, n, d = x.shape
  depth, p = model.depth, model.num_prefix_tokens
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
    states, source, rows, layout, results, outputs = carry
    block = block_at(model, layer)
    # Layers alternate between the two halves of `states`: each reads the half the one
    # before wrote. One carried buffer updated in place; swapping two buffers between
    # loop iterations would make XLA copy both in every layer.
    read = (layer % 2) * total_rows
    write = total_rows - read
    states = _attention_groups(block, states, source + read, write, layout, plan)
    states = _mlp_rows(block, states, write, jnp.sum(layout.counts), plan.chunk_rows)
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
      # An image's special tokens, while they run, are among its first P rows.
      at = jnp.concatenate([jnp.minimum(layout.firsts + j, total_rows - 1) for j in range(p)])
      ran = jnp.concatenate([layout.counts > j for j in range(p)])
      outputs = update_special_outputs(outputs, jnp.tile(layout.images, p), rows.token[at],
                                       ran, y[at], weight[at])
    with jax.named_scope('repack'):
      rows, source, layout = _repack(dataclasses.replace(rows, state=new), b, slots)
    return states, source, rows, layout, results, outputs

  carry = (jnp.concatenate([x, jnp.zeros_like(x)]), jnp.arange(total_rows, dtype=jnp.int32),
           rows, layout, results, jnp.zeros((b, p, d), jnp.float32))
  *_, (depths, ponders, scores), outputs = jax.lax.fori_loop(0, depth, run_layer, carry)
  return removal_output(model, outputs, depths.reshape(b, n), ponders.reshape(b, n),
                        scores.reshape(b, depth, n))
