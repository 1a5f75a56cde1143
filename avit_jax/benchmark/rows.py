"""One model's rows: every mode at every batch size, compact's time split and what
capacity's budget did."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from avit_jax import flops, inference
from avit_jax.benchmark.tables import format_table, format_time_split
from avit_jax.benchmark.timing import time_round_robin

MODES = ('dense', 'masked', 'compact')


def bench_model(name: str, model, model_config, images: np.ndarray, batch_sizes, reps: int,
                torch_seconds=None, log=print, capacity=None) -> list[dict]:
  """Rows of the table for one model: every mode (and the torch peer) at every batch size;
  'capacity' too when per-layer token budgets are given."""
  predictors = {mode: inference.make_predict_fn(model, mode) for mode in MODES}
  if capacity is not None:
    predictors['capacity'] = inference.make_predict_fn(model, 'capacity', capacity=capacity)
  dense_gflops = flops.dense_gflops(model_config)
  rows = []
  for b in batch_sizes:
    x = jnp.asarray(images[:b])
    masked = predictors['masked'](x)
    compact = predictors['compact'](x)
    used = float(np.mean(np.asarray(flops.gflops_per_image(masked.token_depth, model_config))))
    check = dict(max_logit_diff=float(jnp.abs(masked.logits - compact.logits).max()),
                 depth_mismatches=int((masked.token_depth != compact.token_depth).sum()))
    fns = {mode: (lambda p=p: p(x)) for mode, p in predictors.items()}
    cpu = {}
    seconds = time_round_robin(fns, reps, cpu)
    if torch_seconds:
      seconds['pytorch'], cpu['pytorch'] = torch_seconds[b]
    ideal = dense_gflops / used
    for mode, s in seconds.items():
      gflops = dense_gflops if mode in ('dense', 'pytorch') else used
      row = dict(model=name, mode=mode, batch=b, images_per_s=b / s, ms_per_batch=1e3 * s,
                 gflops_per_image=gflops, speed_up=seconds['dense'] / s,
                 ideal_speed_up=1.0 if mode in ('dense', 'pytorch') else ideal,
                 cpu_ms_per_batch=1e3 * cpu[mode], cpu_speed_up=cpu['dense'] / cpu[mode])
      row['efficiency'] = row['speed_up'] / row['ideal_speed_up']
      row['cpu_efficiency'] = row['cpu_speed_up'] / row['ideal_speed_up']
      if mode == 'capacity':
        out = predictors['capacity'](x)
        row.update(capacity_check(out.logits, out.token_depth, masked.logits,
                                  masked.token_depth, capacity, model_config))
      if mode == 'compact':
        row.update(check, compiled_programs=predictors['compact'].compiled_count())
        row['time_split'] = compact_time_split(predictors['compact'], x, masked.token_depth,
                                               model_config, seconds['dense'], reps)
      rows.append(row)
    log(format_table([r for r in rows if r['batch'] == b]))
    log(format_time_split(next(r['time_split'] for r in rows
                               if r['mode'] == 'compact' and r['batch'] == b)))
  return rows


def capacity_check(logits, token_depth, masked_logits, masked_depth, capacity,
                   model_config) -> dict:
  """What the token budget did to a batch: tokens cut (ran fewer layers than in the masked
  model), top-1 agreement and max logit difference with masked, and the GFLOPs per image the
  budget executes (every slot of every layer)."""
  budget_gflops = (flops.embed_head_gflops(model_config)
                   + sum(flops.layer_macs(k, model_config) for k in capacity) / 1e9)
  return dict(capacity=list(capacity), budget_gflops_per_image=float(budget_gflops),
              tokens_cut=int((np.asarray(token_depth) < np.asarray(masked_depth)).sum()),
              top1_agreement=float((np.asarray(logits).argmax(-1)
                                    == np.asarray(masked_logits).argmax(-1)).mean()),
              max_logit_diff=float(np.abs(np.asarray(logits) - np.asarray(masked_logits)).max()))


def compact_time_split(predictor, images, token_depth, model_config, dense_seconds: float,
                       reps: int) -> dict:
  """Where compact's time goes: synchronised per-phase seconds (median of `reps` profiled
  runs), bucket and padding waste, and the blocks' time against their FLOPs share of dense.

  blocks_ideal_ms: dense's time outside embedding and head, scaled by the block FLOPs compact
  needs over the dense block FLOPs; block_efficiency = blocks_ideal / (blocks + repack).
  """
  profiles = [predictor.profile(images) for _ in range(max(1, reps))]
  seconds = {k: float(np.median([p['seconds'][k] for p in profiles]))
             for k in profiles[0]['seconds']}
  p = profiles[0]
  outside = flops.embed_head_gflops(model_config)
  used = float(np.mean(np.asarray(flops.gflops_per_image(token_depth, model_config))))
  dense = flops.dense_gflops(model_config)
  block_fraction = (used - outside) / (dense - outside)
  ideal = (dense_seconds - seconds['embed'] - seconds['finish']) * block_fraction
  return dict(
      ms={k: 1e3 * v for k, v in seconds.items()}, block_calls=p['block_calls'],
      rows_rounding=p['rows_computed'] / p['rows_running'],
      attention_padding=p['attention_computed'] / p['attention_running'],
      block_flops_fraction=block_fraction, blocks_ideal_ms=1e3 * ideal,
      block_efficiency=ideal / (seconds['blocks'] + seconds['repack']))
