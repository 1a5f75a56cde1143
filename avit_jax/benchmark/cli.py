"""python -m avit_jax.benchmark: every mode of one model at every batch size (see the package
doc) and the batch-1 latencies."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np

from avit_jax import command_line, config_lib, inference
from avit_jax.models import flops
from avit_jax.benchmark import measure, phases, profiles, report
from avit_jax.inference import packed

MODES = ('dense', 'masked', 'compact')


def bench_model(name: str, model, model_config, images: np.ndarray, batch_sizes, reps: int, *,
                torch_seconds=None, latency_images: int = 0,
                min_seconds: float = 0.0, compile_repeats: int = 1, profile: bool = False,
                log=print) -> tuple[list[dict], list[dict]]:
  """Rows of the throughput table for one model (every mode, and the torch peer, at every
  batch size) and of its latency table;
  `profile` adds each mode's device time by phase (`phases.phase_times`). The first-batch
  compile time is the median over `compile_repeats` fresh predictors (one compile is a
  single sample of a host whose speed moves) of `measure.compile_seconds`."""
  make = functools.partial(inference.make_predict_fn, model)
  predictors = {mode: make(mode) for mode in MODES}
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
  """{batch: mode} that 'auto' picks when its first batch holds that many images, from the
  speed-ups in the table (`inference.faster_exact_mode` on compact's and masked's time per
  batch relative to dense's), or dense where neither exact mode was timed (halting off)."""
  picks = {}
  for b in dict.fromkeys(r['batch'] for r in rows):
    seconds = {r['mode']: 1.0 / r['speed_up'] for r in rows
               if r['batch'] == b and r['mode'] in inference.EXACT_MODES}
    picks[b] = (inference.faster_exact_mode(seconds)
                if set(seconds) == set(inference.EXACT_MODES) else 'dense')
  return picks


def compact_layer_work(predictor, token_depth) -> dict:
  """Per layer, what the halting with these token depths [B, N] needs against what compact's
  program computes for it, from its plan (numpy, no timing): rows_running and
  attention_running (the running tokens, the sum of their images' squared counts);
  rows_computed (the MLP rows, the whole block's in the sequence layout);
  attention_rows_computed and attention_computed (the padded rows of the attention groups,
  their sum of G * n^2)."""
  depth = np.asarray(token_depth)
  batch, layers = depth.shape[0], predictor.model.depth
  plan = predictor.plan(batch)
  active = (depth[:, None, :] > np.arange(layers)[None, :, None]).sum(-1)
  out = {k: [] for k in ('rows_running', 'attention_running', 'rows_computed',
                         'attention_rows_computed', 'attention_computed')}
  for counts in active.T:
    counts = np.sort(counts)[::-1]
    if plan.layout == 'sequence':
      lengths = [min(n for n in plan.lengths if n >= counts[0]) if counts[0] else 0] * batch
      rows = sum(lengths)
    else:
      _, numbers = packed.group_starts(counts, plan.lengths, plan.groups)
      lengths = [n for n, g, k in zip(plan.lengths, plan.groups, numbers)
                 for _ in range(int(k) * g)]
      small = plan.chunk_rows // 4
      rows = -(-int(counts.sum()) // small) * small
    out['rows_running'].append(int(counts.sum()))
    out['attention_running'].append(int((counts.astype(np.int64) ** 2).sum()))
    out['rows_computed'].append(rows)
    out['attention_rows_computed'].append(int(sum(lengths)))
    out['attention_computed'].append(int(sum(n * n for n in lengths)))
  return out


def compact_work(predictor, token_depth, model_config) -> dict:
  """Compact's computed work over what the halting needs, summed over layers, and the
  efficiency that work allows: the multiply-adds the halting needs over those compact's
  shapes compute (its padded rows too), the efficiency it would reach if every multiply-add
  ran at dense's speed and its bookkeeping were free."""
  work = compact_layer_work(predictor, token_depth)
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


def checkpoint_images(checkpoint: str, data_dir: str, count: int):
  """(first `count` eval images, model, model config) of a trained Fashion-MNIST checkpoint:
  the images of its workdir's config (else configs/fashion_mnist.py) from `data_dir`,
  normalised as the checkpoint's metadata says."""
  from avit_jax import models  # pylint: disable=import-outside-toplevel
  from avit_jax.analysis import figures  # pylint: disable=import-outside-toplevel
  from avit_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  model, metadata = models.load(checkpoint)
  mc = ml_collections.ConfigDict(metadata['model'])
  data = metadata.get('data') or {}
  if mc.image_size != 28 or data.get('source', 'fashion_mnist') != 'fashion_mnist':
    raise ValueError(f'--checkpoint: only Fashion-MNIST models are timed on real test images, '
                     f'got image_size {mc.image_size}, data {data.get("source")!r}')
  config = figures.workdir_config(checkpoint) or command_line.load_config(os.path.join(
      os.path.dirname(__file__), '..', '..', 'configs', 'fashion_mnist.py'))
  config = command_line.load_config(config, [f'--config.data.data_dir={data_dir}'])
  config.data.mean, config.data.std = figures.data_stats(metadata, config)
  return pipeline.eval_images(config, count)[0], model, mc


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
  command_line.quiet_libraries()
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
  command = ' '.join(['python -m avit_jax.benchmark']
                     + list(sys.argv[1:] if argv is None else argv))
  result = dict(machine=report.machine(), date=datetime.date.today().isoformat(),
                command=command, batch_sizes=batch_sizes, reps=reps,
                min_seconds=args.min_seconds, compile_repeats=args.compile_repeats, rows=[],
                latency=[], profiles={}, train_step={}, auto={})
  log = lambda s: print(s, flush=True)  # noqa: E731
  log(f'# {result["machine"]}')
  largest = max(batch_sizes + [latency_images])

  def run(name, model, mc, images):
    torch_seconds = None if args.no_torch else measure.torch_peer_seconds(
        mc, batch_sizes, reps, args.torch_threads)
    rows, latency = bench_model(name, model, mc, images, batch_sizes, reps,
                                torch_seconds=torch_seconds, latency_images=latency_images,
                                min_seconds=args.min_seconds,
                                compile_repeats=max(1, args.compile_repeats),
                                profile=args.profile, log=log)
    result['rows'] += rows
    result['latency'] += latency
    result['auto'][name] = auto_picks(rows)
    log(f'# {name}: mode auto, by the speed-ups above, picks ' + ', '.join(
        f'{m} at batch {b}' for b, m in result['auto'][name].items())
        + ' (the batch of its first call)')

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
    run(mc.variant, model, mc, profiles.synthetic_images(largest, mc.image_size, 2))
    train = measure.train_step_times(mc, train_batch, reps)
    result['train_step'][mc.variant] = train
    log(f'# {mc.variant} train step (batch {train_batch}): '
        + ', '.join(f'{k} {1e3 * v:.0f} ms' for k, v in train['seconds'].items())
        + f'; halting overhead {100 * train["halting_overhead"]:+.1f}% wall '
        '(median of the per-round ratios, which can differ from the medians\' ratio)')
  if args.checkpoint:
    images, model, mc = checkpoint_images(args.checkpoint, args.data_dir, largest)
    run(mc.get('variant', 'checkpoint'), model, mc, images)
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

