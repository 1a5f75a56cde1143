"""python -m avit_jax.benchmark: see the package doc."""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp

from avit_jax import config_lib, halting_profiles, inference
from avit_jax.benchmark import fashion_mnist
from avit_jax.benchmark.rows import bench_model
from avit_jax.benchmark.tables import format_markdown, format_table, machine
from avit_jax.benchmark.timing import torch_peer_seconds, train_step_times


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
      prog='python -m avit_jax.benchmark',
      description='Throughput of dense DeiT vs the A-ViT inference modes (see avit_jax.benchmark)')
  parser.add_argument('--json', default='', help='write the results to this JSON file')
  parser.add_argument('--markdown', default='', help='write the tables as Markdown to this file')
  parser.add_argument('--checkpoint', default='', help='trained A-ViT checkpoint (e.g. the '
                      'Fashion-MNIST default) timed on its test images')
  parser.add_argument('--batch-sizes', default='1,8,64')
  parser.add_argument('--variants', default='tiny,small', help='ImageNet geometries to time')
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--train-batch', type=int, default=16)
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument('--torch-threads', type=int, default=2)
  parser.add_argument('--quick', action='store_true',
                      help='DeiT-T geometry only, batches up to 8, 2 reps, train batch 8')
  args = parser.parse_args(argv)
  try:
    batch_sizes = [int(b) for b in args.batch_sizes.split(',') if b]
  except ValueError:
    batch_sizes = []
  if not batch_sizes or min(batch_sizes) < 1:
    parser.error(f'--batch-sizes must be positive integers separated by commas (e.g. 1,8,64), '
                 f'got {args.batch_sizes!r}')
  variants = [v for v in args.variants.split(',') if v]
  reps, train_batch = args.reps, args.train_batch
  if args.quick:
    batch_sizes = [b for b in batch_sizes if b <= 8]
    variants = [v for v in variants if v == 'tiny']
    reps, train_batch = 2, 8
  for v in variants:
    if v not in halting_profiles.PUBLISHED_FRACTION:
      parser.error(f'--variants: {v!r} is not one of {sorted(halting_profiles.PUBLISHED_FRACTION)}')
  result = dict(machine=machine(), batch_sizes=batch_sizes, reps=reps, rows=[], profiles={},
                train_step={})
  print(f'# {result["machine"]}', flush=True)
  largest = max(batch_sizes)
  log = lambda s: print(s, flush=True)  # noqa: E731
  for variant in variants:
    mc = config_lib.model_config(variant)
    mc.drop_path_rate = 0.0
    mc.gate_scale, mc.gate_center = halting_profiles.PUBLISHED_GATE[variant]
    name = mc.variant
    calibration = halting_profiles.synthetic_images(16 if args.quick else 32, mc.image_size, 1)
    model, info = halting_profiles.build(mc, halting_profiles.PUBLISHED_FRACTION[variant],
                                         calibration, iterations=10 if args.quick else 14)
    result['profiles'][name] = info
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()}
    log(f'# {name}: halting profile {json.dumps(rounded)}')
    capacity = inference.calibrate_capacity(model, jnp.asarray(calibration))
    log(f'# {name}: capacity calibrated on the calibration images: {capacity}')
    torch_seconds = None if args.no_torch else torch_peer_seconds(mc, batch_sizes, reps,
                                                                  args.torch_threads)
    images = halting_profiles.synthetic_images(largest, mc.image_size, 2)
    result['rows'] += bench_model(name, model, mc, images, batch_sizes, reps, torch_seconds, log,
                                  capacity)
    train = train_step_times(mc, train_batch, reps)
    result['train_step'][name] = train
    log(f'# {name} train step (batch {train_batch}): '
        + ', '.join(f'{k} {1e3 * v:.0f} ms' for k, v in train['seconds'].items())
        + f'; halting overhead {100 * train["halting_overhead"]:+.1f}% wall, '
        f'{100 * train["cpu_halting_overhead"]:+.1f}% CPU time')
  if args.checkpoint:
    model, mc, data = fashion_mnist.load_checkpoint(args.checkpoint)
    name = mc.get('variant', 'checkpoint')
    if mc.image_size != 28:
      raise ValueError(f'--checkpoint: only Fashion-MNIST models (image_size 28) are timed on '
                       f'real test images, got image_size {mc.image_size}')
    images = fashion_mnist.test_images(largest, data)
    capacity = inference.calibrate_capacity(
        model, jnp.asarray(fashion_mnist.test_images(2048, data, 'train')))
    log(f'# {name}: capacity calibrated on 2048 training images: {capacity}')
    torch_seconds = None if args.no_torch else torch_peer_seconds(mc, batch_sizes, reps,
                                                                  args.torch_threads)
    result['rows'] += bench_model(name, model, mc, images, batch_sizes, reps, torch_seconds, log,
                                  capacity)
    result['capacity_accuracy'] = fashion_mnist.capacity_accuracy(model, mc, data)
    for r in result['capacity_accuracy']:
      log(f'# {name} test set, {r["mode"]}: top-1 {r["top1"]:.4f}, {r["gflops_per_image"]:.5f} '
          f'GFLOPs/img, tokens cut {100 * r["tokens_cut_fraction"]:.2f}%'
          + (f', budget {r["capacity"]}' if 'capacity' in r else ''))
    train = train_step_times(mc, train_batch, reps)
    result['train_step'][name] = train
    log(f'# {name} train step (batch {train_batch}): halting overhead '
        f'{100 * train["halting_overhead"]:+.1f}% wall, '
        f'{100 * train["cpu_halting_overhead"]:+.1f}% CPU time')
  log('\n' + format_table(result['rows']))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  if args.markdown:
    with open(args.markdown, 'w') as f:
      f.write(format_markdown(result['rows']))
  return result
