"""Inference modes of an A-ViT: dense DeiT, the masked training graph, and real token removal.

`make_predict_fn(model, mode)` returns `predict(images) -> AViTOutput`:
  dense    plain DeiT on every token (halting ignored): the baseline.
  masked   the training graph, `model(images)`: halted tokens are zeroed and masked but still
           computed. Reference answers.
  compact  halted tokens are removed for real, as one compiled program per batch shape with
           no read-back to the host inside a forward (inference/compact.py): the same logits
           as masked (fp32 rounding) and identical token depths and ponder.
  capacity one static graph with a token budget per layer (`calibrate_capacity`); a token
           over budget is cut (halts where it is). Equals masked when nothing is cut, which
           the default calibration guarantees on its calibration images.
  auto     the A-ViT's answers (masked's logits and token depths) from whichever exact mode,
           compact or masked, runs a batch shape faster on this machine: both are timed on
           the first batch of each shape and the choice is kept for that shape
           (`AutoPredictor.mode_for`, `auto_mode`). A model with halting off runs dense.
In compact and capacity, halting_scores hold the score of every layer a token ran (0 after
it halted: the masked graph computes a meaningless value there) and halting_mean is 0, a
training-only quantity. dense, masked and capacity run large batches in chunks of
`chunk_size` images (on CPU about 2^18 token floats per chunk: 8 images of DeiT-T, whose
activations then stay in the caches); compact's MLP matmuls use rows of the same size.
Every mode runs in eval mode (dropout and drop path off); the parameters are those of
`model` when the function is made (`predict.set_params(model)` takes new ones without
recompiling). No training code is imported.

Modules: common (chunking, parameters, class-token head), predictor (dense / masked /
capacity programs), capacity (the budget graph), compact (token removal: its predictor, with
sequence and packed, its two layouts, and shapes, its bucket sizes).
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avit_jax.models import flops
from avit_jax.inference import capacity as capacity_lib
from avit_jax.inference.common import default_chunk_size
from avit_jax.inference.compact import CompactPredictor
from avit_jax.inference.predictor import Predictor
from avit_jax.models.avit import AViT, AViTOutput

__all__ = ['EXACT_MODES', 'PREDICT_MODES', 'PredictFn', 'AutoPredictor', 'CompactPredictor',
           'Predictor', 'auto_mode', 'calibrate_capacity', 'default_chunk_size',
           'faster_exact_mode', 'make_predict_fn', 'time_calls']

PREDICT_MODES = ('dense', 'masked', 'compact', 'capacity', 'auto')
PredictFn = Callable[[jax.Array], AViTOutput]

# Timed calls of each exact mode, after a warm-up call each, when 'auto' meets a batch shape.
AUTO_ROUNDS = 2
EXACT_MODES = ('compact', 'masked')


def faster_exact_mode(seconds: dict) -> str:
  """The exact mode 'auto' picks from seconds per batch of 'compact' and 'masked': compact
  when it is faster, else masked."""
  return 'compact' if seconds['compact'] < seconds['masked'] else 'masked'


def time_calls(fns: dict, rounds: int) -> tuple[dict, dict]:
  """Runs each fn() once to warm up, then `rounds` rounds in turns (each round starts one fn
  later, so no fn always runs first): the median wall seconds per call of each fn and its
  last output."""
  outputs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}
  names = list(fns)
  samples = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      outputs[name] = jax.block_until_ready(fns[name]())
      samples[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in samples.items()}, outputs


def auto_mode(model: AViT, batch: int, images: jax.Array | None = None) -> str:
  """The mode 'auto' picks for batches of `batch` images of `model`: 'dense' for a model with
  halting off, else the faster of 'compact' and 'masked' timed on `images` (None: synthetic
  images of the model's size). Each call times afresh, so on a busy machine two calls can
  disagree where the two modes run about as fast."""
  return AutoPredictor(model).mode_for((batch,) + _image_shape(model), images)


def _image_shape(model: AViT) -> tuple[int, int, int]:
  return (model.image_size, model.image_size, model.in_chans)


def make_predict_fn(model: AViT, mode: str, *, chunk_size: int | None = None,
                    capacity: Sequence[int] | None = None, **compact_options) -> PredictFn:
  """Returns predict(images float32 [B, H, W, 3]) -> AViTOutput for `mode` (PREDICT_MODES).

  chunk_size: images per chunk for large batches (in 'compact': MLP rows per matmul, that
    many images' worth) (None: `default_chunk_size(model)`; 0: the whole batch).
  compact_options: bucket and layout choices of 'compact' (see CompactPredictor); for 'auto'
    also `rounds`, the timed calls of each exact mode per batch shape (see AutoPredictor).
  capacity: for 'capacity', the token budget of every layer (see `calibrate_capacity`).
  """
  if mode not in PREDICT_MODES:
    raise ValueError(f'mode must be one of {PREDICT_MODES}, got {mode!r}')
  if not isinstance(model, AViT):
    raise TypeError(f'expected an avit_jax.models.AViT (models.create), got {type(model).__name__}')
  if mode == 'auto':
    if capacity is not None:
      raise ValueError("capacity is for mode 'capacity', not 'auto'")
    return AutoPredictor(model, chunk_size=chunk_size, **compact_options)
  if mode != 'dense' and not model.halting:
    raise ValueError(f'mode {mode!r} needs a model with halting on (model.halting=True); '
                     "use mode='dense' for a DeiT")
  chunk_size = default_chunk_size(model) if chunk_size is None else int(chunk_size)
  # Eval mode without touching the caller's module: dropout / drop path off in a view that
  # shares the parameter arrays.
  view = nnx.view(model, deterministic=True)
  if mode == 'compact':
    return CompactPredictor(view, chunk_size=chunk_size, **compact_options)
  if compact_options:
    raise ValueError(f'options {sorted(compact_options)} are for mode \'compact\', not {mode!r}')
  if mode == 'capacity':
    capacity = capacity_lib.check(capacity, model)
  elif capacity is not None:
    raise ValueError(f"capacity is for mode 'capacity', not {mode!r}")
  return Predictor(view, mode, chunk_size=chunk_size, capacity=capacity)


def calibrate_capacity(model: AViT, images: jax.Array, *, quantile: float = 1.0,
                       multiple: int | None = None,
                       chunk_size: int | None = None) -> tuple[int, ...]:
  """Per-layer token budgets for mode 'capacity' from the masked model's halting on `images`.

  Budget of layer l: the `quantile` (1.0: the largest) over images of the tokens running at
  layer l, rounded up to a multiple of `multiple` (None: N // 16 clipped to 1..8, so 8 for
  197 tokens and 1 for 17) and capped at N. With quantile 1.0 no calibration image loses a
  token; lower quantiles cut tokens of the busiest images.
  """
  if not 0.0 < quantile <= 1.0:
    raise ValueError(f'quantile must be in (0, 1], got {quantile}')
  n = model.num_tokens
  multiple = min(8, max(1, n // 16)) if multiple is None else multiple
  depth = make_predict_fn(model, 'masked', chunk_size=chunk_size)(images).token_depth
  active = np.asarray(flops.active_tokens_per_layer(depth, model.depth))  # [B, L]
  per_layer = np.quantile(active, quantile, axis=0, method='higher')
  return tuple(int(min(n, max(multiple, -(-int(v) // multiple) * multiple))) for v in per_layer)


class AutoPredictor:
  """Mode 'auto': the A-ViT's answers from the faster exact mode for each batch shape.

  With halting on, the first batch of a shape is run in 'compact' and in 'masked' (compiling
  both), each timed `rounds` more times in turns, and the faster (`faster_exact_mode`) runs
  every later batch of that shape; either gives masked's logits and token depths. With
  halting off, 'dense' (the model is plain DeiT). `modes` holds the choice per batch shape.
  """

  def __init__(self, model: AViT, *, rounds: int = AUTO_ROUNDS, **options):
    if int(rounds) < 1:
      raise ValueError(f'rounds must be at least 1, got {rounds}')
    self.model = model
    self.rounds = rounds
    self.modes = {}
    self.seconds = {}
    self._options = options
    self._predictors = {}

  def mode_for(self, batch_shape: Sequence[int], images: jax.Array | None = None) -> str:
    """The mode for images of `batch_shape` [B, H, W, C]: cached, else decided by timing both
    exact modes on `images` (None: synthetic images of that shape)."""
    batch_shape = tuple(int(d) for d in batch_shape)
    if images is not None:
      self.model.check_images(images)
      if tuple(images.shape) != batch_shape:
        raise ValueError(f'images of shape {tuple(images.shape)} given for batch shape '
                         f'{batch_shape}')
    if batch_shape not in self.modes:
      if images is None:
        self.model.check_images(jnp.zeros((0,) + batch_shape[1:]))
        images = jax.random.normal(jax.random.key(0), batch_shape, jnp.float32)
      self._decide(images)
    return self.modes[batch_shape]

  def _decide(self, images: jax.Array) -> AViTOutput | None:
    """Decides the mode of this batch shape; returns that mode's output for `images` where
    timing produced it."""
    shape = tuple(images.shape)
    if not self.model.halting:
      self.modes[shape] = 'dense'
      return None
    fns = {mode: functools.partial(self._predictor(mode), images) for mode in EXACT_MODES}
    self.seconds[shape], outputs = time_calls(fns, self.rounds)
    self.modes[shape] = faster_exact_mode(self.seconds[shape])
    return outputs[self.modes[shape]]

  def _predictor(self, mode: str):
    if mode not in self._predictors:
      options = self._options if mode == 'compact' else {'chunk_size': self._options.get(
          'chunk_size')}
      self._predictors[mode] = make_predict_fn(self.model, mode, **options)
    return self._predictors[mode]

  def set_params(self, model: AViT) -> None:
    """Takes new parameters without recompiling; as they change the halting, each batch
    shape is timed again at its next call."""
    self.model = model
    self.modes.clear()
    self.seconds.clear()
    for predictor in self._predictors.values():
      predictor.set_params(model)

  def compiled_count(self) -> int:
    return sum(p.compiled_count() for p in self._predictors.values())

  def __call__(self, images: jax.Array) -> AViTOutput:
    self.model.check_images(images)
    shape = tuple(images.shape)
    if shape not in self.modes:
      if isinstance(images, jax.core.Tracer):  # traced: no values to time on
        self.mode_for(shape)
      else:
        out = self._decide(images)
        if out is not None:
          return out
    return self._predictor(self.modes[shape])(images)
