"""The static shapes of token removal: bucket sizes, a batch size's plan, and running the
program of the bucket a traced count falls in (no host read-back)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def buckets(limit: int, granule: int) -> tuple[int, ...]:
  """granule, 2 * granule, ... up to and including `limit`."""
  return tuple(sorted({min(limit, k) for k in range(granule, limit + granule, granule)}))


def granule(limit: int, count: int) -> int:
  """A step of about limit / count, rounded up to a multiple of 8 (matmul-friendly sizes)."""
  return max(8, math.ceil(limit / max(1, count) / 8) * 8)


def bucket_of(count, sizes):
  """The smallest of `sizes` (sorted) that holds `count`; 0 when count is 0."""
  index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count.astype(jnp.int32))
  return jnp.where(count > 0, jnp.asarray(sizes, jnp.int32)[jnp.minimum(index, len(sizes) - 1)],
                   0)


def select(bucket, sizes, make_fn, carry, *, copy_bytes: int = 1 << 20):
  """make_fn(size)(carry) for the size equal to `bucket` (carry unchanged for 0).

  A small carry goes through one lax.switch; a large one through a loop of 0 or 1 trips per
  size (`run_if`), since a conditional copies every buffer it returns, which for the rows
  of a batch of 64 costs more than the layer saves.
  """
  nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(carry))
  if nbytes <= copy_bytes:
    index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), bucket)
    index = jnp.where(bucket > 0, index + 1, 0)
    return jax.lax.switch(index, [lambda c: c] + [make_fn(size) for size in sizes], carry)
  for size in sizes:
    carry = run_if(bucket == size, make_fn(size), carry)
  return carry


def run_if(condition, fn, carry):
  """fn(carry) if condition else carry, as a loop of 0 or 1 trips: unlike lax.cond, a loop
  updates its carry in place. fn must compute from its carry: XLA hoists work that only
  reads values from outside a loop out of it, and would run it whatever the condition."""

  return jax.lax.fori_loop(0, condition.astype(jnp.int32), lambda _, c: fn(c), carry)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static shape choices of one batch size (see `compact.CompactPredictor.plan`)."""
  layout: str                   # 'sequence' or 'packed'
  lengths: tuple[int, ...]      # attention lengths (tokens per image) to pick from
  groups: tuple[int, ...] = ()  # packed: images per attention group at each length
  chunk_rows: int = 1           # packed: rows per step of the token-wise loops
