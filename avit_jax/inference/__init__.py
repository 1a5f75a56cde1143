"""Inference modes of an A-ViT: `make_predict_fn(model, mode)` -> predict(images) -> AViTOutput.

  dense    plain DeiT on every token, halting ignored: the baseline.
  masked   the training graph, `model(images)`: halted tokens are masked but still computed.
           The reference answers.
  compact  halted tokens removed for real, one compiled program per batch shape with no
           read-back to the host (compact.py): masked's logits up to fp32 rounding, and
           identical token depths and ponder.
  auto     the A-ViT's answers from whichever of compact and masked runs faster: both are
           timed on the predictor's first batch and the faster runs every batch after
           (dense for a model with halting off).

Every mode runs in eval mode (dropout and drop path off) on the parameters `model` holds
when the function is made (`predict.set_params(model)` takes new ones without compiling
again). In compact, halting_scores are 0 after a token halted, and halting_mean (a training
quantity) is 0.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avit_jax.inference.common import Predictor, default_chunk_size, map_chunks
from avit_jax.inference.compact import CompactPredictor
from avit_jax.models.avit import AViT, AViTOutput

__all__ = ['EXACT_MODES', 'PREDICT_MODES', 'AutoPredictor', 'CompactPredictor', 'PredictFn',
           'Predictor', 'auto_mode', 'default_chunk_size', 'faster_exact_mode',
           'make_predict_fn']

PREDICT_MODES = ('dense', 'masked', 'compact', 'auto')
EXACT_MODES = ('compact', 'masked')
PredictFn = Callable[[jax.Array], AViTOutput]

# Timed calls of each exact mode after its first (compiling) call: two, taken in turns, so
# that neither mode is always timed first, at a cost small next to the compiles.
_AUTO_ROUNDS = 2


def make_predict_fn(model: AViT, mode: str, *, chunk_size: int | None = None) -> PredictFn:
  """predict(images float32 [B, H, W, C]) -> AViTOutput for `mode` (one of PREDICT_MODES).

  chunk_size: images per chunk of a large batch (None: `default_chunk_size(model)`; 0: the
  whole batch at once). Answers do not depend on it beyond fp32 rounding.
  """
  if mode not in PREDICT_MODES:
    raise ValueError(f'mode must be one of {PREDICT_MODES}, got {mode!r}')
  if not isinstance(model, AViT):
    raise TypeError(f'expected an avit_jax.models.AViT (models.create), got {type(model).__name__}')
  if mode == 'auto':
    return AutoPredictor(model, chunk_size=chunk_size)
  if mode != 'dense' and not model.halting:
    raise ValueError(f'mode {mode!r} needs a model with halting on (model.halting=True); '
                     "use mode='dense' for a DeiT")
  chunk_size = default_chunk_size(model) if chunk_size is None else int(chunk_size)
  # Eval mode without touching the caller's module: a view sharing its parameter arrays.
  view = nnx.view(model, deterministic=True)
  if mode == 'compact':
    return CompactPredictor(view, chunk_size=chunk_size)
  forward = _dense if mode == 'dense' else _masked
  return Predictor(view, lambda m, images: forward(m, images, chunk_size))


def _dense(model, images, chunk_size: int) -> AViTOutput:
  """Plain DeiT on every token; every token reported as running all L layers."""
  (logits, dist_logits), _ = map_chunks(
      lambda x: model.forward_heads(model.forward_features(x)), images, chunk_size)
  b, n, depth = images.shape[0], model.num_tokens, model.depth
  full = jnp.full((b, n), float(depth), jnp.float32)
  return AViTOutput(logits=logits, token_depth=full, ponder=full,
                    halting_mean=jnp.zeros((depth,), jnp.float32),
                    halting_scores=jnp.zeros((b, depth, n), jnp.float32),
                    dist_logits=dist_logits)


def _masked(model, images, chunk_size: int) -> AViTOutput:
  """The training graph, `model(images)`, chunk by chunk."""
  out, n = map_chunks(model, images, chunk_size)
  if n == 1:
    return out
  # lax.map stacked halting_mean [chunks, L] and map_chunks flattened it; the chunks are of
  # equal size, so the mean of the chunk means is the mean over the batch.
  return dataclasses.replace(out, halting_mean=out.halting_mean.reshape(n, -1).mean(0))


def faster_exact_mode(seconds: dict) -> str:
  """The mode auto picks from seconds per batch of 'compact' and 'masked'."""
  return 'compact' if seconds['compact'] < seconds['masked'] else 'masked'


def auto_mode(model: AViT, batch: int) -> str:
  """The mode auto picks for `model` when its first batch holds `batch` images (timed on
  random images of the model's size; two calls can disagree where the modes run about as
  fast)."""
  shape = (batch, model.image_size, model.image_size, model.in_chans)
  return AutoPredictor(model).decide(jax.random.normal(jax.random.key(0), shape, jnp.float32))


class AutoPredictor:
  """Mode 'auto': the A-ViT's answers (masked's logits and token depths) from the faster
  exact mode, decided once: at the first call, compact and masked are each run (compiling
  them) and timed `_AUTO_ROUNDS` times in turns; `mode` then runs every call. `seconds`
  holds the timing. A model with halting off runs dense."""

  def __init__(self, model: AViT, *, chunk_size: int | None = None):
    self.model = model
    self.mode = None if model.halting else 'dense'
    self.seconds = {}
    self._chunk_size = chunk_size
    self._predictors = {}

  def decide(self, images: jax.Array) -> str:
    """The mode, timed on `images` unless already decided."""
    self._decide(images)
    return self.mode

  def _decide(self, images) -> AViTOutput | None:
    """Decides the mode if not yet done; the chosen mode's output on `images` if timed."""
    if self.mode is not None:
      return None
    self.model.check_images(images)
    fns = {mode: functools.partial(self._predictor(mode), images) for mode in EXACT_MODES}
    outputs = {mode: jax.block_until_ready(fn()) for mode, fn in fns.items()}
    samples = {mode: [] for mode in fns}
    for r in range(_AUTO_ROUNDS):
      for mode in EXACT_MODES[r % 2:] + EXACT_MODES[:r % 2]:
        start = time.perf_counter()
        outputs[mode] = jax.block_until_ready(fns[mode]())
        samples[mode].append(time.perf_counter() - start)
    self.seconds = {mode: float(np.median(s)) for mode, s in samples.items()}
    self.mode = faster_exact_mode(self.seconds)
    return outputs[self.mode]

  def _predictor(self, mode: str):
    if mode not in self._predictors:
      self._predictors[mode] = make_predict_fn(self.model, mode, chunk_size=self._chunk_size)
    return self._predictors[mode]

  def set_params(self, model: AViT) -> None:
    """Takes new parameters without compiling again; the mode stays as decided."""
    self.model = model
    for p in self._predictors.values():
      p.set_params(model)

  def compiled_count(self) -> int:
    return sum(p.compiled_count() for p in self._predictors.values())

  def __call__(self, images: jax.Array) -> AViTOutput:
    self.model.check_images(images)
    if self.mode is None:
      if isinstance(images, jax.core.Tracer):  # traced: no values to time on
        self.decide(jax.random.normal(jax.random.key(0), images.shape, jnp.float32))
      else:
        return self._decide(images)
    return self._predictor(self.mode)(images)
