"""Timing: modes round-robin in one process, the PyTorch peer in a child process, and one
training step of masked A-ViT against dense DeiT."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avit_jax import losses, models


def time_round_robin(fns: dict, reps: int, cpu: dict | None = None) -> dict:
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


def train_step_times(model_config, batch: int, reps: int, seed: int = 0) -> dict:
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
  times = time_round_robin(fns, reps, cpu)
  return {'batch': batch, 'seconds': times, 'cpu_seconds': cpu,
          'halting_overhead': times['masked A-ViT'] / times['dense DeiT'] - 1.0,
          'cpu_halting_overhead': cpu['masked A-ViT'] / cpu['dense DeiT'] - 1.0}
