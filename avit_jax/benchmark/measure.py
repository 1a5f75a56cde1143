"""What the benchmark measures: throughput round-robin, batch-1 latency, the first batch's
compile time, host reads per forward, the PyTorch peer and one training step."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avit_jax import models
from avit_jax.training import losses


def compile_seconds(predictor, images) -> float:
  """Wall seconds to trace, lower and compile a predictor's program for this batch shape,
  with jax's ahead-of-time API: no run is timed and subtracted (a first call less a later
  one carries the noise of two runs, at large batches as large as the compile itself, and
  counts what a first run costs beyond compiling)."""
  start = time.perf_counter()
  predictor.jitted.lower(*predictor.arguments(images)).compile()
  return time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class RoundRobin:
  """Timings of fns run in turns: per call, the median wall and CPU seconds (CPU: this
  process, all threads, which on a machine shared with other jobs measures the work done,
  not the waiting for a core), and every round's wall seconds."""
  seconds: dict
  cpu_seconds: dict
  rounds: dict

  def speed_up(self, name: str, reference: str) -> float:
    """Median over rounds of reference's time / name's time in the same round: each ratio
    compares calls a second or so apart, so a shared host's slow spells, which last longer,
    cancel out in it (a ratio of medians mixes calls made minutes apart)."""
    return float(np.median(np.asarray(self.rounds[reference]) / np.asarray(self.rounds[name])))


def time_round_robin(fns: dict, reps: int, *, min_seconds: float = 0.0) -> RoundRobin:
  """Times each fn() in turns after a warm-up call each: at least `reps` rounds, and more
  until `min_seconds` have passed (cheap calls get more samples); every round starts one fn
  later than the last, so each fn takes every place in a round in turn."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  names = list(fns)
  rounds = {name: [] for name in names}
  cpu_times = {name: [] for name in names}
  start_all = time.perf_counter()
  r = 0
  while r < reps or time.perf_counter() - start_all < min_seconds:
    for name in names[r % len(names):] + names[:r % len(names)]:
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fns[name]())
      rounds[name].append(time.perf_counter() - start)
      cpu_times[name].append(time.process_time() - start_cpu)
    r += 1
  median = lambda samples: {n: float(np.median(t)) for n, t in samples.items()}  # noqa: E731
  return RoundRobin(seconds=median(rounds), cpu_seconds=median(cpu_times), rounds=rounds)


def latency(predictors: dict, images: np.ndarray, reps: int) -> dict:
  """Batch-1 latency of each predictor over the images, one image at a time, the modes in
  turns for each image: {mode: {'median_ms', 'p90_ms', 'samples'}}."""
  singles = [jnp.asarray(images[i:i + 1]) for i in range(len(images))]
  for predict in predictors.values():
    jax.block_until_ready(predict(singles[0]))
  samples = {mode: [] for mode in predictors}
  for _ in range(reps):
    for x in singles:
      for mode, predict in predictors.items():
        start = time.perf_counter()
        jax.block_until_ready(predict(x))
        samples[mode].append(time.perf_counter() - start)
  return {mode: dict(median_ms=1e3 * float(np.median(s)), p90_ms=1e3 * float(np.percentile(s, 90)),
                     samples=len(s)) for mode, s in samples.items()}


def host_reads_per_forward(predict, images) -> int | None:
  """0 when the whole forward traces as one jax program (a value read back to the host
  during a forward cannot be traced) with no host callback in it; None otherwise."""
  try:
    jaxpr = jax.make_jaxpr(predict)(images)
  except jax.errors.ConcretizationTypeError:
    return None
  return None if any('callback' in e.primitive.name for e in _equations(jaxpr.jaxpr)) else 0


def _equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (loops, conditionals, calls) too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          yield from _equations(getattr(inner, 'jaxpr', inner))


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
  import importlib.util  # pylint: disable=import-outside-toplevel
  if any(importlib.util.find_spec(m) is None for m in ('torch', 'transformers')):
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
  targets = jax.nn.one_hot(labels, c.num_classes) * 0.9 + 0.1 / c.num_classes
  prior = losses.prior_target(c.depth, min(8, c.depth), 1.0)
  fns = {}
  for name, halting in (('dense DeiT', False), ('masked A-ViT', True)):
    mc = ml_collections.ConfigDict(c.to_dict())
    mc.halting = halting
    model = models.create(mc, seed=seed)
    model.train()  # a training step: dropout and drop path as configured
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, graphdef=graphdef, rest=rest, halting=halting):
      out = nnx.merge(graphdef, params, rest)(images)
      loss = losses.soft_target_cross_entropy(out.logits, targets)
      if halting:
        loss += losses.ponder_loss(out.ponder, 5e-4) + losses.prior_loss(
            out.halting_mean, prior, 1e-3)
      return loss

    step = jax.jit(jax.value_and_grad(loss_fn))
    fns[name] = lambda step=step, params=params: step(params)
  timed = time_round_robin(fns, reps)
  cpu = timed.cpu_seconds
  return {'batch': batch, 'seconds': timed.seconds, 'cpu_seconds': cpu,
          'halting_overhead': 1.0 / timed.speed_up('masked A-ViT', 'dense DeiT') - 1.0,
          'cpu_halting_overhead': cpu['masked A-ViT'] / cpu['dense DeiT'] - 1.0}
