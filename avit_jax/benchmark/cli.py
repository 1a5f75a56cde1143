"""python -m avit_jax.benchmark: every mode of one model at every batch size (see the package
doc), the batch-1 latencies, and for a trained checkpoint what capacity's budget costs."""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import ml_collections
import numpy as np

from avit_jax import config_lib, inference
from avit_jax.models import flops
from avit_jax.benchmark import measure, phases, profiles, report

MODES = ('dense', 'masked', 'compact', 'capacity')


def bench_model(name: str, model, model_config, images: np.ndarray, batch_sizes, reps: int, *,
                capacity=None, torch_seconds=None, latency_images: int = 0,
                min_seconds: float = 0.0, compile_repeats: int = 1, profile: bool = False,
                log=print) -> tuple[list[dict], list[dict]]:
  """Rows of the throughput table for one model (every mode, and the torch peer, at every
  batch size; 'capacity' when per-layer budgets are given) and of its latency table;
  `profile` adds each mode's device time by phase (`phases.phase_times`). The first-batch
  compile time is the median over `compile_repeats` fresh predictors (one compile is a
  single sample of a host whose speed moves) of `measure.compile_seconds`."""
  modes = [m for m in MODES if m != 'capacity' or capacity is not None]

  def make(mode):
    options = {'capacity': capacity} if mode == 'capacity' else {}
    return inference.make_predict_fn(model, mode, **options)

  predictors = {mode: make(mode) for mode in modes}
  dense_gflops = flops.dense_gflops(model_config)
  rows = []
  for b in batch_sizes:
    x = jnp.asarray(images[:b])
    compile_s = {mode: float(np.median([measure.compile_seconds(make(mode), x)
                                        for _ in range(compile_repeats)]))
                 for mode in predictors}
    masked = predictors['masked'](x)
    used = float(np.mean(np.asarray(flops.gflops_per_image(masked.token_depth, model_config))))
    timed = measure.time_round_robin({mode: (lambda p=p: p(x)) for mode, p in
                                      predictors.items()}, reps, min_seconds=min_seconds)
    seconds, cpu = dict(timed.seconds), dict(timed.cpu_seconds)
    if torch_seconds:
      seconds['pytorch'], cpu['pytorch'] = torch_seconds[b]
    for mode, s in seconds.items():
      exact = mode not in ('dense', 'pytorch')
      # The peer runs in its own process, so its ratio is of medians, not of rounds.
      speed_up = (timed.speed_up(mode, 'dense') if mode in timed.rounds
                  else seconds['dense'] / s)
      row = dict(model=name, mode=mode, batch=b, images_per_s=b / s, ms_per_batch=1e3 * s,
                 cpu_ms_per_batch=1e3 * cpu[mode], speed_up=speed_up,
                 gflops_per_image=used if exact else dense_gflops,
                 ideal_speed_up=dense_gflops / used if exact else 1.0)
      row['efficiency'] = row['speed_up'] / row['ideal_speed_up']
      row['cpu_efficiency'] = cpu['dense'] / cpu[mode] / row['ideal_speed_up']
      if mode in predictors:
        row['compile_s'] = compile_s[mode]
        row['compile_vs_dense'] = compile_s[mode] / compile_s['dense']
        row['host_reads'] = measure.host_reads_per_forward(predictors[mode], x)
        out = predictors[mode](x)
        row['max_logit_diff'] = float(jnp.abs(out.logits - masked.logits).max())
        row['depth_mismatches'] = int((out.token_depth != masked.token_depth).sum())
      if mode == 'capacity':
        row.update(capacity_check(out.logits, out.token_depth, masked.logits,
                                  masked.token_depth, capacity, model_config))
      if mode == 'compact':
        row['work'] = compact_work(predictors['compact'], masked.token_depth, model_config)
      if profile and mode in predictors:
        row['phases'] = phases.phase_times(predictors[mode], x)
      rows.append(row)
    log(report.format_table([r for r in rows if r['batch'] == b]))
    log(report.format_work([r for r in rows if r['batch'] == b]))
    if profile:
      log(report.format_phases([r for r in rows if r['batch'] == b]))
  latency = []
  if latency_images:
    lat = measure.latency(predictors, images[:latency_images], max(1, reps // 2))
    depth = np.asarray(predictors['masked'](jnp.asarray(images[:latency_images])).token_depth)
    median_gflops = float(np.median(np.asarray(flops.gflops_per_image(depth, model_config))))
    for mode, r in lat.items():
      latency.append(dict(model=name, mode=mode, images=latency_images, **r,
                          speed_up=lat['dense']['median_ms'] / r['median_ms'],
                          ideal_speed_up=1.0 if mode == 'dense' else dense_gflops / median_gflops))
    log(report.format_latency(latency))
  return rows, latency


def auto_picks(rows: list[dict]) -> dict:
  """{batch: mode} that 'auto' picks from these timings: at each batch size the faster of
  compact and masked (`inference.faster_exact_mode` on their seconds per batch, the rule
  'auto' applies to its own timing), or dense where neither was timed (halting off)."""
  picks = {}
  for b in dict.fromkeys(r['batch'] for r in rows):
    seconds = {r['mode']: r['ms_per_batch'] for r in rows
               if r['batch'] == b and r['mode'] in inference.EXACT_MODES}
    picks[b] = (inference.faster_exact_mode(seconds)
                if set(seconds) == set(inference.EXACT_MODES) else 'dense')
  return picks


def compact_work(predictor, token_depth, model_config) -> dict:
  """Compact's computed work over what the halting needs, summed over layers, and the
  efficiency that work allows: the multiply-adds the halting needs over those compact's
  shapes compute (its padded rows too), the efficiency it would reach if every multiply-add
  ran at dense's speed and its bookkeeping were free."""
  work = predictor.work(token_depth)
  batch = np.asarray(token_depth).shape[0]
  total = lambda key: float(sum(work[key]))  # noqa: E731
  outside = batch * flops.embed_head_gflops(model_config) * 1e9
  needed = outside + flops.block_macs(total('rows_running'), total('rows_running'),
                                      total('attention_running'), model_config)
  computed = outside + flops.block_macs(total('rows_computed'), total('attention_rows_computed'),
                                        total('attention_computed'), model_config)
  return dict(layout=predictor.plan(batch).layout,
              rows_rounding=total('rows_computed') / total('rows_running'),
              attention_rows_padding=total('attention_rows_computed') / total('rows_running'),
              attention_padding=total('attention_computed') / total('attention_running'),
              efficiency_ceiling=needed / computed,
              per_layer={k: [int(v) for v in vs] for k, vs in work.items()})


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


def fashion_mnist_images(data: dict, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` Fashion-MNIST images [B, 28, 28, 3] of `split` ('train', 'test'),
  normalised as the checkpoint's metadata['data'] says, and their labels."""
  from avit_jax.data import sources# pylint: disable=import-outside-toplevel  (tensorflow)
  table = sources.fashion_mnist(data['data_dir'], split)
  raw, labels = table.images[:count], table.labels[:count]
  x = raw.astype(np.float32)[..., None].repeat(3, axis=-1) / 255.0
  x = (x - np.asarray(data['mean'], np.float32)) / np.asarray(data['std'], np.float32)
  return x, np.asarray(labels, np.int32)


def capacity_accuracy(model, model_config, data: dict, quantiles=(1.0, 0.99, 0.9, 0.5),
                      calibration_images: int = 2048, batch: int = 500) -> list[dict]:
  """Accuracy effect of 'capacity' on the Fashion-MNIST test set: budgets calibrated on the
  first training images at each quantile; top-1 against masked, tokens cut, and the GFLOPs
  per image the budget executes against those masked uses."""
  images, labels = fashion_mnist_images(data, 'test', 10_000)
  calibration = jnp.asarray(fashion_mnist_images(data, 'train', calibration_images)[0])

  def run(predict):
    outs = [predict(jnp.asarray(images[i:i + batch])) for i in range(0, len(images), batch)]
    return (np.concatenate([np.asarray(o.logits) for o in outs]),
            np.concatenate([np.asarray(o.token_depth) for o in outs]))

  logits, depth = run(inference.make_predict_fn(model, 'masked'))
  used = float(np.mean(np.asarray(flops.gflops_per_image(depth, model_config))))
  rows = [dict(mode='masked', top1=float((logits.argmax(-1) == labels).mean()),
               gflops_per_image=used, tokens_cut_fraction=0.0)]
  for q in quantiles:
    budget = inference.calibrate_capacity(model, calibration, quantile=q)
    c_logits, c_depth = run(inference.make_predict_fn(model, 'capacity', capacity=budget))
    check = capacity_check(c_logits, c_depth, logits, depth, budget, model_config)
    rows.append(dict(mode=f'capacity q={q}', capacity=list(budget),
                     top1=float((c_logits.argmax(-1) == labels).mean()),
                     gflops_per_image=check['budget_gflops_per_image'],
                     tokens_cut_fraction=check['tokens_cut'] / depth.size,
                     top1_agreement=check['top1_agreement']))
  return rows


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
      prog='python -m avit_jax.benchmark',
      description='Throughput and latency of dense DeiT vs the A-ViT inference modes')
  parser.add_argument('--json', default='', help='write the results to this JSON file')
  parser.add_argument('--markdown', default='', help='write the tables as Markdown to this file')
  parser.add_argument('--checkpoint', default='', help='trained Fashion-MNIST A-ViT checkpoint '
                      '(or its workdir) timed on its test images')
  parser.add_argument('--data-dir', default='/usr/share/datasets/fashion-mnist',
                      help="the checkpoint's Fashion-MNIST IDX files")
  parser.add_argument('--batch-sizes', default=None, help='default 1,8,64 (--quick: 1,8)')
  parser.add_argument('--variants', default=None,
                      help='ImageNet geometries to time: default tiny,small (--quick: tiny)')
  parser.add_argument('--reps', type=int, default=5, help='rounds of every mode, at least')
  parser.add_argument('--min-seconds', type=float, default=10.0,
                      help='more rounds until this many seconds per batch size have passed')
  parser.add_argument('--compile-repeats', type=int, default=3,
                      help='ahead-of-time compiles of fresh predictors per mode and batch '
                      'size, whose median gives the first-batch compile time')
  parser.add_argument('--latency-images', type=int, default=32,
                      help='images timed one at a time for the batch-1 latency (0: none)')
  parser.add_argument('--train-batch', type=int, default=16)
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument('--torch-threads', type=int, default=2)
  parser.add_argument('--profile', action='store_true',
                      help="each mode's device time by phase (attention, mlp, halting, repack, "
                      '...) from jax.profiler, CPU only')
  parser.add_argument('--quick', action='store_true',
                      help='DeiT-T geometry only, batches up to 8, 2 rounds, 8 latency images')
  args = parser.parse_args(argv)
  # Every option is checked before any work, with or without --quick; --quick never drops
  # what was asked for explicitly.
  text = args.batch_sizes or ('1,8' if args.quick else '1,8,64')
  try:
    batch_sizes = [int(b) for b in text.split(',') if b]
  except ValueError:
    batch_sizes = []
  if not batch_sizes or min(batch_sizes) < 1:
    parser.error(f'--batch-sizes must be positive integers separated by commas (e.g. 1,8,64), '
                 f'got {args.batch_sizes!r}')
  variants = [v for v in (args.variants or ('tiny' if args.quick else 'tiny,small')).split(',')
              if v]
  for v in variants:
    if v not in profiles.PUBLISHED_FRACTION:
      parser.error(f'--variants: {v!r} is not one of {sorted(profiles.PUBLISHED_FRACTION)}')
  if not variants:
    parser.error(f'--variants: expected names separated by commas, got {args.variants!r}')
  reps, train_batch, latency_images = args.reps, args.train_batch, args.latency_images
  if args.quick:
    if max(batch_sizes) > 8 or variants != ['tiny']:
      parser.error('--quick times DeiT-T geometry (--variants tiny) at batches up to 8; drop '
                   f'--quick to time --variants {",".join(variants)} --batch-sizes '
                   f'{",".join(map(str, batch_sizes))}')
    reps, train_batch, latency_images = 2, 8, min(latency_images, 8)
    args.min_seconds, args.compile_repeats = 0.0, 1
  result = dict(machine=report.machine(), batch_sizes=batch_sizes, reps=reps,
                min_seconds=args.min_seconds, compile_repeats=args.compile_repeats, rows=[],
                latency=[], profiles={}, train_step={}, auto={})
  log = lambda s: print(s, flush=True)  # noqa: E731
  log(f'# {result["machine"]}')
  largest = max(batch_sizes + [latency_images])

  def run(name, model, mc, images, capacity):
    torch_seconds = None if args.no_torch else measure.torch_peer_seconds(
        mc, batch_sizes, reps, args.torch_threads)
    rows, latency = bench_model(name, model, mc, images, batch_sizes, reps, capacity=capacity,
                                torch_seconds=torch_seconds, latency_images=latency_images,
                                min_seconds=args.min_seconds,
                                compile_repeats=max(1, args.compile_repeats),
                                profile=args.profile, log=log)
    result['rows'] += rows
    result['latency'] += latency
    result['auto'][name] = auto_picks(rows)
    log(f'# {name}: mode auto picks (the faster exact mode timed above) ' + ', '.join(
        f'{m} at batch {b}' for b, m in result['auto'][name].items()))

  for variant in variants:
    mc = config_lib.model_config(variant)
    mc.drop_path_rate = 0.0
    mc.gate_scale, mc.gate_center = profiles.PUBLISHED_GATE[variant]
    calibration = profiles.synthetic_images(16 if args.quick else 32, mc.image_size, 1)
    model, info = profiles.build(mc, profiles.PUBLISHED_FRACTION[variant], calibration,
                                 iterations=10 if args.quick else 14)
    result['profiles'][mc.variant] = info
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()}
    log(f'# {mc.variant}: halting profile {json.dumps(rounded)}')
    capacity = inference.calibrate_capacity(model, jnp.asarray(calibration))
    log(f'# {mc.variant}: capacity calibrated on the calibration images: {capacity}')
    run(mc.variant, model, mc, profiles.synthetic_images(largest, mc.image_size, 2), capacity)
    train = measure.train_step_times(mc, train_batch, reps)
    result['train_step'][mc.variant] = train
    log(f'# {mc.variant} train step (batch {train_batch}): '
        + ', '.join(f'{k} {1e3 * v:.0f} ms' for k, v in train['seconds'].items())
        + f'; halting overhead {100 * train["halting_overhead"]:+.1f}% wall '
        '(median of the per-round ratios, which can differ from the medians\' ratio)')
  if args.checkpoint:
    from avit_jax import models  # pylint: disable=import-outside-toplevel
    model, metadata = models.load(args.checkpoint)
    mc = ml_collections.ConfigDict(metadata['model'])
    data = metadata.get('data') or {}
    if mc.image_size != 28 or data.get('source', 'fashion_mnist') != 'fashion_mnist':
      raise ValueError(f'--checkpoint: only Fashion-MNIST models are timed on real test images, '
                       f'got image_size {mc.image_size}, data {data.get("source")!r}')
    data = dict(data, data_dir=args.data_dir)
    name = mc.get('variant', 'checkpoint')
    capacity = inference.calibrate_capacity(
        model, jnp.asarray(fashion_mnist_images(data, 'train', 2048)[0]))
    log(f'# {name}: capacity calibrated on 2048 training images: {capacity}')
    run(name, model, mc, fashion_mnist_images(data, 'test', largest)[0], capacity)
    result['capacity_accuracy'] = capacity_accuracy(model, mc, data)
    for r in result['capacity_accuracy']:
      log(f'# {name} test set, {r["mode"]}: top-1 {r["top1"]:.4f}, {r["gflops_per_image"]:.5f} '
          f'GFLOPs/img, tokens cut {100 * r["tokens_cut_fraction"]:.2f}%'
          + (f', budget {r["capacity"]}' if 'capacity' in r else ''))
  log('\n' + report.format_table(result['rows']))
  if result['latency']:
    log('\n' + report.format_latency(result['latency']))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  if args.markdown:
    with open(args.markdown, 'w') as f:
      f.write(report.format_markdown(result))
  return result

