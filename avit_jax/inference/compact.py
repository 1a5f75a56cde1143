"""'compact' mode: halted tokens removed for real, one compiled program per batch shape.

Everything runs on the device, in a loop over layers; each layer picks, from the running-
token counts the device itself computed, block programs of bucketed sizes (static shapes
compiled once). Two layouts:

* sequence (batch 1): [B, N] with each image's running tokens first, in their order; each
  layer runs `vit.Block` on the first n positions, n the longest image's count rounded up
  to a length bucket, the padding masked as keys. Nothing else: no grouping, no packing.
* packed (larger batches): the running tokens of the whole batch as rows, image after
  image, the images in decreasing order of running tokens. The block's attention branch
  runs per group of G consecutive images (G set per length bucket) on a [G, n] layout of
  their states padded to the group's longest image (similar counts, so little padding);
  its MLP branch (two thirds of the weights' FLOPs) on the rows themselves, in a loop of
  fixed-size steps (no buckets). A repack after each layer drops the halted rows and
  re-sorts the images (cumulative sums, no sort over rows) without moving the token
  states: the next layer reads them through the repack's index map.

In both, one halting step (`AViT.halting_step`) updates every row, only each image's class
token keeps the output accumulator (the head reads nothing else), and tokens keep running
until they halt themselves, also after their class token halted: the logits are final
then, but the other tokens' depths (and FLOPs) must be the masked model's.

Modules: this one (the predictor and its plans), sequence and packed (the two layouts),
shapes (bucket sizes and picking a bucket's program on the device: a loop of 0 or 1 trips
rather than lax.switch wherever the buffers are large, as on CPU a conditional copies every
buffer it returns).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avit_jax.inference import packed, sequence
from avit_jax.inference.common import ParamLeaves, map_chunks
from avit_jax.inference.shapes import Plan, buckets, granule
from avit_jax.models.avit import AViT, AViTOutput


def default_group(batch: int) -> int:
  """Images per attention group (see `GROUP_FLOATS` for the full length): 2 for small
  batches, whose images' counts differ a lot, up to 4 for 64 and more, where sorting makes
  neighbours alike (measured on CPU, DeiT-T: groups of 8 pad 13% of the attention rows at
  batch 64, groups of 4 10%)."""
  return min(4, max(2, batch // 16))


# Floats of the qkv projection (G x N x 3D) of an attention group at the full length N,
# where the first layers hold every image whole. XLA on CPU runs the attention core of a
# layout of more than about 790 000 as one fused kernel, 17-30% faster per image than the
# four kernels of a smaller one (measured on a 2-core Xeon: DeiT-T from 1379 query rows on,
# DeiT-S from 720; 8 DeiT-T images at length 197 in 466 us each against 577 us in groups
# of 4). Shorter lengths keep `default_group`: groups that large there ran no faster at
# batch 64 (their padding ate the gain).
GROUP_FLOATS = 800_000


# Attention length buckets (steps of about N / 6: 40, 80, ..., 197 for DeiT): each is a
# program of its own, compiled with the first batch (the whole block in the sequence
# layout, the attention branch in the packed one), and a count is rounded up to the next.
# Measured on CPU, DeiT-T: at batch 1, against 4 lengths, 1.18-1.20x dense's median latency
# instead of 1.15x (2-core Xeon) at a compile 0.06-0.2 s longer; 12 lengths gave 1.37-1.45x
# on a 2-core EPYC but compiled 5.7-8.5x dense's time. At batches 6 run as fast as 12
# (EPYC, batch 64: 1 % slower) and compile in 2.5x dense's time instead of 3.4x.
LENGTH_BUCKETS = 6


def default_row_chunk() -> int:
  """Rows per step of the token-wise loops: 1408 on CPU, 2048 on accelerators.

  A step's matmuls run faster per row the more rows they hold, up to about a thousand:
  measured on CPU, batch 64, against 704-row steps (which a 2-core EPYC ran as fast per row
  as whole-batch matmuls), 1408 made compact 3-4 points more efficient on a 2-core Xeon
  with AVX-512 (DeiT-T 0.80 -> 0.83-0.85, DeiT-S 0.89 -> 0.93), at the same compile time.
  Larger steps gained nothing more there, and a layer's last quarter step computes up to
  a quarter step of rows in vain.
  """
  return 2048 if jax.default_backend() != 'cpu' else 1408


class CompactPredictor:
  """Token removal as one jitted program per batch shape, no read-back inside a forward.

  The bucket counts trade compile time (each size is a program of its own, compiled with
  the first batch) against padding (a count is rounded up to the next size):
  sequence_batch: batches up to this size use the sequence layout, larger ones the packed.
  length_buckets: number of attention lengths (multiples of 8, in steps of about N / it);
    None: `LENGTH_BUCKETS`.
  group: images per attention group of the packed layout at every length (None:
    `default_group(batch)`, and at the full length N enough images for `GROUP_FLOATS`
    where the batch has that many).
  row_chunk: rows per step of the packed layout's token-wise loops at most (None:
    `default_row_chunk`; a quarter of the batch's tokens when that is fewer); a layer runs
    whole steps, then quarter steps, so it computes its running rows rounded up to a
    multiple of a quarter step.
  """

  def __init__(self, model: AViT, *, chunk_size: int, sequence_batch: int = 1,
               length_buckets: int | None = None, group: int | None = None,
               row_chunk: int | None = None):
    self.model = model
    self.chunk_size = chunk_size
    self.tokens = model.num_tokens
    self.sequence_batch = sequence_batch
    self.length_buckets = length_buckets
    self.group = group
    self.row_chunk = row_chunk or default_row_chunk()
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
    layout = 'sequence' if batch <= self.sequence_batch else 'packed'
    lengths = buckets(n, granule(n, self.length_buckets or LENGTH_BUCKETS))
    if layout == 'sequence':
      return Plan('sequence', lengths)
    groups = (min(batch, self.group or default_group(batch)),) * len(lengths)
    full = -(-GROUP_FLOATS // (n * 3 * self.model.cls_token.shape[-1]))
    if not self.group and full <= batch:
      groups = groups[:-1] + (full,)
    # Small batches (or models) step by a quarter of their rows at most, so that the
    # rounding stays small against a layer's rows.
    chunk_rows = min(self.row_chunk, max(32, -(-batch * n // 128) * 32))
    return Plan('packed', lengths, groups=groups, chunk_rows=chunk_rows)

  def work(self, token_depth) -> dict:
    """What the program computes for halting with these token depths [B, N], layer by
    layer, against what the halting needs (numpy; no timing):

    rows_running / attention_running: running tokens, and the sum of their images'
    squared counts; rows_computed: token rows the row loops run (the MLP branch; the whole
    block in the sequence layout); attention_rows_computed / attention_computed: the
    padded rows of the groups (the attention branch) and their sum of G * n^2.
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
        _, numbers = packed.group_starts(counts, plan.lengths, plan.groups)
        lengths = [length for length, group, number in zip(plan.lengths, plan.groups, numbers)
                   for _ in range(int(number) * group)]
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
      return sequence.forward(model, self._blocks, stacked, x, plan)
    return packed.forward(model, self._blocks, stacked, x, plan)


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
