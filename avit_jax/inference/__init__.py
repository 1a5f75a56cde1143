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
  auto     compact where removing tokens pays for its bookkeeping, else dense (`auto_mode`).
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

from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from avit_jax import flops
from avit_jax.inference import capacity as capacity_lib
from avit_jax.inference.common import default_chunk_size
from avit_jax.inference.compact import CompactPredictor
from avit_jax.inference.predictor import Predictor
from avit_jax.models.avit import AViT, AViTOutput

__all__ = ['PREDICT_MODES', 'PredictFn', 'CompactPredictor', 'Predictor', 'auto_mode',
           'calibrate_capacity', 'default_chunk_size', 'make_predict_fn']

PREDICT_MODES = ('dense', 'masked', 'compact', 'capacity', 'auto')
PredictFn = Callable[[jax.Array], AViTOutput]

# auto: compact when an image's token-wise work per layer is at least this many
# multiply-adds (N * 12 D^2: DeiT-T 8.7e7, the Fashion-MNIST default 8.4e5). A layer of
# token removal has bookkeeping of its own (halting step, repack, picking a bucket, many
# small operations); below this the tokens it removes save less than that costs, at every
# batch size measured (1 to 64).
AUTO_COMPACT_MACS = 1e7


def auto_mode(model: AViT, batch: int) -> str:
  """The mode 'auto' runs for batches of `batch` images: 'compact' or 'dense' (on this rule
  the same for every batch size)."""
  del batch  # kept in the signature: a rule for accelerators may depend on it
  if not model.halting:
    return 'dense'
  dim = model.cls_token.shape[-1]
  work = model.num_tokens * 12 * dim * dim
  return 'compact' if work >= AUTO_COMPACT_MACS else 'dense'


def make_predict_fn(model: AViT, mode: str, *, chunk_size: int | None = None,
                    capacity: Sequence[int] | None = None, **compact_options) -> PredictFn:
  """Returns predict(images float32 [B, H, W, 3]) -> AViTOutput for `mode` (PREDICT_MODES).

  chunk_size: images per chunk for large batches (in 'compact': MLP rows per matmul, that
    many images' worth) (None: `default_chunk_size(model)`; 0: the whole batch).
  compact_options: bucket and layout choices of 'compact' (see CompactPredictor).
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
  """Mode 'auto': for each batch size the predictor of `auto_mode(model, batch)`."""

  def __init__(self, model: AViT, **options):
    self.model = model
    self._options = options
    self._predictors = {}

  def mode(self, batch: int) -> str:
    return auto_mode(self.model, batch)

  def _predictor(self, mode: str):
    if mode not in self._predictors:
      options = self._options if mode == 'compact' else {'chunk_size': self._options.get(
          'chunk_size')}
      self._predictors[mode] = make_predict_fn(self.model, mode, **options)
    return self._predictors[mode]

  def set_params(self, model: AViT) -> None:
    self.model = model
    for predictor in self._predictors.values():
      predictor.set_params(model)

  def compiled_count(self) -> int:
    return sum(p.compiled_count() for p in self._predictors.values())

  def __call__(self, images: jax.Array) -> AViTOutput:
    self.model.check_images(images)
    return self._predictor(self.mode(images.shape[0]))(images)
