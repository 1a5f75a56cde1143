"""Where a forward's time goes, by phase: device time of the compiled program's operations
(jax.profiler's trace), each attributed to the phase named by the innermost `jax.named_scope`
around the code that made it (`PHASES`: the block's two branches, the halting step, token
removal's bookkeeping, embedding and head).

Works on the CPU backend, whose trace names every event after the operation of the compiled
program it ran; elsewhere `phase_times` returns None. The times are sums over events: an
operation whose work XLA splits over several threads counts each part, so a mode's total can
exceed its wall time, while a chain of small operations
in a loop sums to about its wall time. Compare phases, and modes phase by phase.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

# Scopes set in models/vit.py, models/avit.py and inference/ (sequence.py, packed.py).
PHASES = ('attention', 'mlp', 'halting', 'repack', 'layout', 'embed', 'head')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*?)op_name="([^"]*)"', re.M)
# Operations that run other computations: their events enclose those of their operations.
_CONTAINER = re.compile(r'\s(?:while|conditional|call)\(')


def phase_of(op_name: str) -> str:
  """The phase of an operation from its op_name metadata ('other' when in no phase scope)."""
  parts = op_name.split('/')
  for part in reversed(parts):
    if part in PHASES:
      return part
  return 'other'


def phase_times(predict, images, reps: int = 3) -> dict | None:
  """Mean device milliseconds per forward of `predict` (an inference predictor, with
  `jitted` and `arguments`) by phase, over `reps` traced calls after a warm-up call; None
  where the backend's trace does not name the program's operations."""
  if jax.default_backend() != 'cpu':
    return None
  args = predict.arguments(images)
  hlo = predict.jitted.lower(*args).compile().as_text()
  phase = {name: phase_of(op) for name, text, op in _INSTRUCTION.findall(hlo)
           if not _CONTAINER.search(text)}
  jax.block_until_ready(predict.jitted(*args))
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(reps):
        jax.block_until_ready(predict.jitted(*args))
    paths = glob.glob(os.path.join(logdir, '**', '*.trace.json.gz'), recursive=True)
    if not paths:
      return None
    with gzip.open(paths[0]) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and event.get('name') in phase:
      totals[phase[event['name']]] += event.get('dur', 0)
  if not totals:
    return None
  return {name: totals[name] / 1e3 / reps for name in PHASES + ('other',)}
