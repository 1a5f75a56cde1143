"""'compact' mode: halted tokens removed for real, one compiled program per batch shape.

Everything runs on the device, in a loop over layers. Each layer runs the block on the
running tokens only, in shapes of a few fixed sizes (buckets, compiled once): a bucket's
program is a loop whose trip count the device computes from its own running-token counts,
so no value is read back to the host. Batch 1 uses the sequence layout (sequence.py: the
image's running tokens first, the block run on the first n positions), larger batches the
packed one (packed.py: the running tokens of the whole batch as rows, attention per group of
images of similar counts, the MLP on the rows), which wastes less on padding across images.

In both, one halting step (`AViT.halting_step`) updates every running token, only the special
tokens (class, distillation) keep an output accumulator (the heads read nothing else), and
tokens run until they halt themselves, also after their image's class token halted, so that
token depths, ponder and FLOPs are the masked model's.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from avit_jax.inference import packed, sequence
from avit_jax.inference.common import Predictor, map_chunks
from avit_jax.models.avit import AViT

# Attention lengths: each is a program of its own, compiled with the first batch, and a
# running count is rounded up to the next. Six keep the rounding within about N / 6 tokens
# at a compile time a small multiple of dense's; more lengths cost compile time for little.
_LENGTH_BUCKETS = 6

# Floats of the qkv projection (G x N x 3D) of an attention group at the full length N,
# where the first layers hold every image whole: XLA on CPU runs the attention core of a
# layout about this large as one fused kernel, faster per image than the several kernels of
# a smaller one, so full-length groups take enough images to reach it. Shorter lengths
# keep `_group`: their padding would eat the gain.
_GROUP_FLOATS = 800_000


def _group(batch: int) -> int:
  """Images per attention group: few in small batches, whose images' counts differ a lot,
  more in large ones, where sorting by count makes neighbours alike (less padding)."""
  return min(4, max(2, batch // 16))


def _row_chunk() -> int:
  """Rows per step of the MLP loop: a matmul runs faster per row the more rows it holds, up
  to about a thousand on CPU, while a larger step computes more rows in vain at the end of
  a layer; accelerators want larger matmuls."""
  return 2048 if jax.default_backend() != 'cpu' else 1408


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static shapes of one batch size."""
  layout: str                   # 'sequence' (batch 1) or 'packed'
  lengths: tuple[int, ...]      # attention lengths (tokens per image), increasing
  groups: tuple[int, ...] = ()  # packed: images per attention group at each length
  chunk_rows: int = 1           # packed: rows per step of the MLP loop


def plan(batch: int, tokens: int, dim: int) -> Plan:
  """The layout and bucket sizes of batches of `batch` images of N = `tokens` tokens."""
  # Multiples of 8 (sizes matmuls like), in steps of about N / _LENGTH_BUCKETS, and N.
  step = max(8, math.ceil(tokens / _LENGTH_BUCKETS / 8) * 8)
  lengths = tuple(sorted({min(tokens, k) for k in range(step, tokens + step, step)}))
  if batch == 1:
    return Plan('sequence', lengths)
  group = min(batch, _group(batch))
  full = -(-_GROUP_FLOATS // (tokens * 3 * dim))
  groups = (group,) * (len(lengths) - 1) + (full if full <= batch else group,)
  # Small batches step by a quarter of their rows at most, so that the rounding of a
  # layer's rows to whole steps stays small.
  chunk_rows = min(_row_chunk(), max(32, -(-batch * tokens // 128) * 32))
  return Plan('packed', lengths, groups=groups, chunk_rows=chunk_rows)


class CompactPredictor(Predictor):
  """Token removal as one jitted program per batch shape, no read-back inside a forward."""

  def __init__(self, model: AViT, *, chunk_size: int):
    def forward(model, images):
      x, _ = map_chunks(model.embed, images, chunk_size or images.shape[0])
      shapes = self.plan(x.shape[0])
      layout = sequence if shapes.layout == 'sequence' else packed
      return layout.forward(model, x, shapes)

    super().__init__(model, forward)

  def plan(self, batch: int) -> Plan:
    """The layout and bucket sizes used for batches of `batch` images."""
    return plan(batch, self.model.num_tokens, self.model.cls_token.shape[-1])
