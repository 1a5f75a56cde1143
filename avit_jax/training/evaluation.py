"""Evaluation: top-1/top-5, loss, token depth, per-layer active fraction, GFLOPs, images/s.

Sums are computed on device per batch (padding masked out) and added up on the host, so
the metrics are exact over the split whatever the batch size and device count.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from avit_jax.models import flops


def eval_sums(out, labels: jax.Array, mask: jax.Array, model_config) -> dict:
  """Per-batch sums from a model output; mask [B] is 1 for real images, 0 for padding."""
  logits = out.logits
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  correct1 = (top5[:, 0] == labels).astype(jnp.float32)
  correct5 = (top5 == labels[:, None]).any(-1).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  depth = out.token_depth
  active = flops.active_tokens_per_layer(depth, model_config.depth).astype(jnp.float32)
  gflops = flops.gflops_per_image(depth, model_config)
  return {
      'count': mask.sum(),
      'top1': (correct1 * mask).sum(),
      'top5': (correct5 * mask).sum(),
      'eval_loss': (loss * mask).sum(),
      'mean_token_depth': (depth.mean(-1) * mask).sum(),
      'active_tokens_per_layer': (active * mask[:, None]).sum(0),
      'gflops_per_image': (gflops * mask).sum(),
  }


def evaluate(sums_fn: Callable[[dict], dict], batches: Iterable[dict], *,
             num_tokens: int, dense_gflops: float) -> dict:
  """Runs `sums_fn` (batch -> eval_sums dict, jitted) over every batch; returns the metrics.

  num_tokens: N (models.num_tokens). images_per_second excludes the first batch
  (compilation) when there is more than one. The gflops_* values are multiply-adds, as
  published FLOPs counts are (docs/algorithm.md, "FLOPs").
  """
  totals, images, start, first_done = None, 0.0, None, 0.0
  for batch in batches:
    sums = jax.device_get(sums_fn(batch))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    if start is None:
      start, first_done = time.perf_counter(), float(sums['count'])
    images += float(sums['count'])
  if totals is None or float(totals['count']) == 0:
    raise ValueError('the evaluation split yielded no images')
  elapsed = time.perf_counter() - start
  timed = images - first_done
  count = float(totals['count'])
  gflops = float(totals['gflops_per_image']) / count
  return {
      'num_images': int(count),
      'top1': float(totals['top1']) / count,
      'top5': float(totals['top5']) / count,
      'eval_loss': float(totals['eval_loss']) / count,
      'mean_token_depth': float(totals['mean_token_depth']) / count,
      'active_token_fraction_per_layer': [
          float(a) / (count * num_tokens) for a in np.asarray(totals['active_tokens_per_layer'])],
      'gflops_per_image': gflops,
      'dense_gflops_per_image': dense_gflops,
      'compute_fraction': gflops / dense_gflops,
      'images_per_second': timed / elapsed if timed > 0 and elapsed > 0 else float('nan'),
  }
