"""Throughput of dense DeiT vs masked and compact A-ViT, with FLOPs and a PyTorch peer row.

  python -m avit_jax.benchmark [--json FILE] [--markdown FILE] [--checkpoint DIR]
      [--batch-sizes 1,8,64] [--quick]

For DeiT-T / DeiT-S geometry (224, 197 tokens) the A-ViT halting comes from
`halting_profiles` (random weights calibrated to the published compute fraction); with
--checkpoint, a trained model (e.g. the Fashion-MNIST default) runs on its test images.
Columns: images/s, ms/batch, GFLOPs/image (multiply-adds, AVIT.md convention: executed by
dense, used by A-ViT), speed-up over our dense, ideal speed-up (dense FLOPs / A-ViT FLOPs)
and efficiency = speed-up / ideal. Modes are timed round-robin in one process (median of
`--reps`), so ratios are side by side even on a busy machine. Also times one training
step (value_and_grad of the loss) of masked A-ViT against dense DeiT. No train import.
Where compact's time goes: after each table, a profiled compact run (synchronised after every
call) splits its time into embedding, blocks, repack and head, and sets the blocks against
dense's time scaled by the block FLOPs compact needs (block efficiency), with the rows and
attention computed over those needed (bucket rounding, attention padding).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avit_jax import config_lib, flops, halting_profiles, inference, losses, models

MODES = ('dense', 'masked', 'compact')


def _time_round_robin(fns: dict, reps: int, cpu: dict | None = None) -> dict:
  """Median wall seconds per call of each fn(), timed in turns (after a warm-up call each).

  `cpu`, when given, receives the median CPU seconds of this process (all threads) per call:
  on a machine shared with other jobs it measures the work done, which waiting for the
  cores does not inflate.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  cpu_times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
      cpu_times[name].append(time.process_time() - start_cpu)
  if cpu is not None:
    cpu.update({name: float(np.median(t)) for name, t in cpu_times.items()})
  return {name: float(np.median(t)) for name, t in times.items()}


_TORCH_SCRIPT = r"""
import json, sys, time
import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification
c, batches, reps, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
net = ViTForImageClassification(ViTConfig(
    hidden_size=c['dim'], num_hidden_layers=c['depth'], num_attention_heads=c['heads'],
    intermediate_size=int(c['dim'] * c['mlp_ratio']), image_size=c['image_size'],
    patch_size=c['patch'], num_channels=c['in_chans'], num_labels=c['num_classes'],
    layer_norm_eps=1e-6, hidden_act='gelu')).eval()
out = {}
for b in batches:
  x = torch.randn(b, c['in_chans'], c['image_size'], c['image_size'])
  with torch.inference_mode():
    net(pixel_values=x)
    times, cpu = [], []
    for _ in range(reps):
      start, start_cpu = time.perf_counter(), time.process_time()
      net(pixel_values=x)
      times.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
  out[b] = [float(np.median(times)), float(np.median(cpu))]
print(json.dumps(out))
"""


def torch_peer_seconds(model_config, batch_sizes, reps: int, threads: int = 2) -> dict | None:
  """Median (wall, CPU) seconds per batch of transformers' ViT at these DeiT shapes (eval,
  inference_mode, `threads` threads), or None without torch / transformers.

  Runs in a child process: PyTorch's OpenMP threads keep spinning after each call and
  would slow down XLA running next to them in the same process (and the reverse).
  """
  try:
    import importlib.util  # pylint: disable=import-outside-toplevel
    if any(importlib.util.find_spec(m) is None for m in ('torch', 'transformers')):
      return None
  except ValueError:
    return None
  arg = json.dumps([model_config.to_dict(), list(batch_sizes), reps, threads])
  proc = subprocess.run([sys.executable, '-c', _TORCH_SCRIPT, arg], capture_output=True,
                        text=True, check=False)
  if proc.returncode:
    print(f'# PyTorch peer failed: {proc.stderr.strip().splitlines()[-1:]}', flush=True)
    return None
  return {int(b): tuple(s) for b, s in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def _train_step_times(model_config, batch: int, reps: int, seed: int = 0) -> dict:
  """Seconds per jitted value_and_grad step: masked A-ViT (CE + ponder + prior) vs DeiT (CE)."""
  rng = np.random.default_rng(seed)
  c = model_config
  images = jnp.asarray(rng.normal(size=(batch, c.image_size, c.image_size, c.in_chans)),
                       jnp.float32)
  labels = jnp.asarray(rng.integers(0, c.num_classes, size=batch))
  targets = losses.smooth_labels(labels, c.num_classes, 0.1)
  prior = losses.prior_target(c.depth, min(8, c.depth), 1.0)
  fns = {}
  for name, halting in (('dense DeiT', False), ('masked A-ViT', True)):
    mc = ml_collections.ConfigDict(c.to_dict())
    mc.halting = halting
    graphdef, params, rest = nnx.split(models.create(mc, seed=seed), nnx.Param, ...)

    def loss_fn(params, graphdef=graphdef, rest=rest, halting=halting):
      out = nnx.merge(graphdef, params, rest)(images)
      loss = losses.soft_target_cross_entropy(out.logits, targets)
      if halting:
        loss += losses.ponder_loss(out.ponder, 5e-4) + losses.prior_loss(
            out.halting_mean, prior, 1e-3)
      return loss

    step = jax.jit(jax.value_and_grad(loss_fn))
    fns[name] = lambda step=step, params=params: step(params)
  cpu = {}
  times = _time_round_robin(fns, reps, cpu)
  return {'batch': batch, 'seconds': times, 'cpu_seconds': cpu,
          'halting_overhead': times['masked A-ViT'] / times['dense DeiT'] - 1.0,
          'cpu_halting_overhead': cpu['masked A-ViT'] / cpu['dense DeiT'] - 1.0}


def _fashion_mnist_test_images(count: int, data: dict | None = None,
                               split: str = 't10k') -> np.ndarray:
  """First `count` Fashion-MNIST images [B, 28, 28, 3] of `split` ('t10k' test, 'train'),
  normalised with the checkpoint's metadata['data'] mean / std when given, else those of
  configs/fashion_mnist.py."""
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  defaults = fashion_mnist.get_config().data
  data = dict(data or {})
  mean = data.get('mean', defaults.mean)
  std = data.get('std', defaults.std)
  path = os.path.join(defaults.data_dir, f'{split}-images-idx3-ubyte.gz')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: install the Fashion-MNIST IDX files '
                            '(tools/bootstrap.sh) or drop --checkpoint')
  with gzip.open(path, 'rb') as f:
    raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
  x = raw.astype(np.float32)[..., None].repeat(3, axis=-1) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _fashion_mnist_test_labels() -> np.ndarray:
  from configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  path = os.path.join(fashion_mnist.get_config().data.data_dir, 't10k-labels-idx1-ubyte.gz')
  with gzip.open(path, 'rb') as f:
    return np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int32)


def capacity_accuracy(model, model_config, data, quantiles=(1.0, 0.99, 0.9, 0.5),
                      calibration_images: int = 2048, batch: int = 500) -> list[dict]:
  """Accuracy effect of 'capacity' on the Fashion-MNIST test set: budgets calibrated on the
  first training images at each quantile; top-1 against masked, tokens cut, and the GFLOPs
  per image the budget executes against those masked uses."""
  images = _fashion_mnist_test_images(10_000, data)
  labels = _fashion_mnist_test_labels()[:len(images)]
  calibration = jnp.asarray(_fashion_mnist_test_images(calibration_images, data, 'train'))

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


def _load_checkpoint(directory: str):
  from avit_jax import checkpoints  # pylint: disable=import-outside-toplevel
  params, metadata = checkpoints.load_params(directory)
  if 'model' not in metadata:
    raise ValueError(f'{directory} has no metadata["model"]: cannot rebuild the model')
  model_config = ml_collections.ConfigDict(metadata['model'])
  model = models.create(model_config, seed=0)
  checkpoints.assign_params(model, params, directory)
  return model, model_config, metadata.get('data')


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
    seconds = _time_round_robin(fns, reps, cpu)
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
  budget_gflops = (flops.gflops_per_image(jnp.zeros((1, 1)), model_config)[0]
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
  outside = float(np.mean(np.asarray(flops.gflops_per_image(jnp.zeros_like(token_depth),
                                                              model_config))))
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


def format_time_split(split: dict) -> str:
  ms = split['ms']
  return (f'# compact, synchronised after every call: embed {ms["embed"]:.1f} ms, blocks '
          f'{ms["blocks"]:.1f} ms ({split["block_calls"]} calls), repack {ms["repack"]:.1f} ms, '
          f'finish {ms["finish"]:.1f} ms; blocks at dense speed per FLOP '
          f'{split["blocks_ideal_ms"]:.1f} ms (block efficiency {split["block_efficiency"]:.2f}); '
          f'rows computed / running {split["rows_rounding"]:.3f}, attention computed / running '
          f'{split["attention_padding"]:.3f}')


def format_table(rows: list[dict]) -> str:
  head = (f'{"model":<24}{"mode":<9}{"batch":>6}{"img/s":>9}{"ms/batch":>10}{"GFLOPs/img":>11}'
          f'{"speed-up":>9}{"ideal":>7}{"effic.":>7}{"cpu-ms":>9}{"cpu-effic.":>11}')
  lines = [head]
  for r in rows:
    lines.append(f'{r["model"]:<24}{r["mode"]:<9}{r["batch"]:>6}{r["images_per_s"]:>9.1f}'
                 f'{r["ms_per_batch"]:>10.1f}{r["gflops_per_image"]:>11.3f}{r["speed_up"]:>9.2f}'
                 f'{r["ideal_speed_up"]:>7.2f}{r["efficiency"]:>7.2f}'
                 f'{r["cpu_ms_per_batch"]:>9.1f}{r["cpu_efficiency"]:>11.2f}')
  return '\n'.join(lines)


def format_markdown(rows: list[dict]) -> str:
  """The rows as one Markdown table per model (the README's tables), each followed by the
  compact time split of every batch size."""
  names = {'pytorch': 'PyTorch (transformers ViT)'}
  out = []
  for model in dict.fromkeys(r['model'] for r in rows):
    mine = [r for r in rows if r['model'] == model]
    out += [f'{model}:', '',
            '| batch | mode | img/s | ms/batch | GFLOPs/img | speed-up | ideal | efficiency '
            '| CPU-time efficiency |', '|---|---|---|---|---|---|---|---|---|']
    out += [f'| {r["batch"]} | {names.get(r["mode"], r["mode"])} | {r["images_per_s"]:.1f} | '
            f'{r["ms_per_batch"]:.1f} | {r["gflops_per_image"]:.3f} | {r["speed_up"]:.2f} | '
            f'{r["ideal_speed_up"]:.2f} | {r["efficiency"]:.2f} | {r["cpu_efficiency"]:.2f} |'
            for r in mine]
    out += ['', '| batch | embed ms | blocks ms (calls) | repack ms | blocks at dense speed per '
            'FLOP, ms | block efficiency | rows computed / running | attention computed / '
            'running |', '|---|---|---|---|---|---|---|---|']
    for r in mine:
      if r['mode'] == 'compact':
        t = r['time_split']
        out.append(f'| {r["batch"]} | {t["ms"]["embed"]:.1f} | {t["ms"]["blocks"]:.1f} '
                   f'({t["block_calls"]}) | {t["ms"]["repack"]:.1f} | {t["blocks_ideal_ms"]:.1f}'
                   f' | {t["block_efficiency"]:.2f} | {t["rows_rounding"]:.3f} | '
                   f'{t["attention_padding"]:.3f} |')
    out.append('')
  return '\n'.join(out)


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    cpu = f'{names[0]} x{len(names)}' if names else cpu
  except OSError:
    pass
  devices = ', '.join(sorted({d.device_kind for d in jax.devices()}))
  return f'{cpu}; jax {jax.__version__} on {jax.default_backend()} ({devices})'


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
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
    train = _train_step_times(mc, train_batch, reps)
    result['train_step'][name] = train
    log(f'# {name} train step (batch {train_batch}): '
        + ', '.join(f'{k} {1e3 * v:.0f} ms' for k, v in train['seconds'].items())
        + f'; halting overhead {100 * train["halting_overhead"]:+.1f}% wall, '
        f'{100 * train["cpu_halting_overhead"]:+.1f}% CPU time')
  if args.checkpoint:
    model, mc, data = _load_checkpoint(args.checkpoint)
    name = mc.get('variant', 'checkpoint')
    if mc.image_size != 28:
      raise ValueError(f'--checkpoint: only Fashion-MNIST models (image_size 28) are timed on '
                       f'real test images, got image_size {mc.image_size}')
    images = _fashion_mnist_test_images(largest, data)
    capacity = inference.calibrate_capacity(
        model, jnp.asarray(_fashion_mnist_test_images(2048, data, 'train')))
    log(f'# {name}: capacity calibrated on 2048 training images: {capacity}')
    torch_seconds = None if args.no_torch else torch_peer_seconds(mc, batch_sizes, reps,
                                                                  args.torch_threads)
    result['rows'] += bench_model(name, model, mc, images, batch_sizes, reps, torch_seconds, log,
                                  capacity)
    result['capacity_accuracy'] = capacity_accuracy(model, mc, data)
    for r in result['capacity_accuracy']:
      log(f'# {name} test set, {r["mode"]}: top-1 {r["top1"]:.4f}, {r["gflops_per_image"]:.5f} '
          f'GFLOPs/img, tokens cut {100 * r["tokens_cut_fraction"]:.2f}%'
          + (f', budget {r["capacity"]}' if 'capacity' in r else ''))
    train = _train_step_times(mc, train_batch, reps)
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


if __name__ == '__main__':
  main()
