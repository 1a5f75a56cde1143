"""Inference modes of an A-ViT: dense DeiT, the masked training graph, and real token removal.

`make_predict_fn(model, mode)` returns `predict(images) -> AViTOutput`:
  dense    plain DeiT on every token (halting ignored): the baseline.
  masked   the training graph, `model(images)`: halted tokens are zeroed and masked but still
           computed. Reference answers.
  compact  halted tokens are removed for real. The running tokens of the whole batch are
           packed into rows (image by image, each image's tokens in their original order, so
           its class token comes first), and the images are sorted by how many tokens they
           still run. Each block runs group by group (G = `chunk_size` consecutive images,
           so of similar counts): qkv, proj and the MLP (most of the FLOPs) on the group's
           packed rows, attention per image on a [G, n] layout padded to the group's longest
           image, the padding masked as keys exactly like a halted token. A repack after
           each layer drops the halted rows and re-sorts the images. Row windows and n are
           rounded up to a few bucket sizes, so the block compiles once per bucket pair;
           the per-image counts are read back to the host after each layer.
           Tokens keep running until they halt themselves, also after their image's class
           token halted: the logits no longer change then, but the depths (and FLOPs) of the
           other tokens must equal the masked model's. Same logits as masked (fp32 rounding)
           and identical token depths and ponder. halting_scores hold the score of every
           layer a token ran (0 after it halted: the masked graph computes a meaningless value
           there) and halting_mean is 0: it is a training-only quantity.
  capacity one static graph with a token budget per layer (`calibrate_capacity`): no host
           read-back, for TPUs; equals masked when no token is over budget.
dense, masked and capacity run large batches in chunks of `chunk_size` images (default on CPU: 2^18
token floats per chunk, 8 images of DeiT-T): XLA on CPU runs DeiT-T faster per image on
chunks of 8 than on a batch of 64, whose activations fall out of the caches.
Every mode runs in eval mode (dropout and drop path off); the
parameters are those of `model` when the function is made (`predict.set_params(model)` takes
new ones without recompiling). No training code is imported.

Modules: common (chunking, parameters, head), predictor (dense / masked / capacity
programs), capacity (the budget graph), compact (packed rows and their host driver).
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

__all__ = ['MODES', 'PredictFn', 'CompactPredictor', 'Predictor', 'calibrate_capacity',
           'default_chunk_size', 'make_predict_fn']

MODES = ('dense', 'masked', 'compact', 'capacity')
PredictFn = Callable[[jax.Array], AViTOutput]


def make_predict_fn(model: AViT, mode: str, *, chunk_size: int | None = None,
                    token_buckets: int = 32, query_buckets: int = 8,
                    capacity: Sequence[int] | None = None) -> PredictFn:
  """Returns predict(images float32 [B, H, W, 3]) -> AViTOutput for `mode` (see MODES).

  chunk_size: images per chunk for large batches, and per block group in 'compact' (None:
    `default_chunk_size(model)`; 0: the whole batch).
  token_buckets / query_buckets: bucket granularity of 'compact' (see CompactPredictor).
  capacity: for 'capacity', the token budget of every layer (see `calibrate_capacity`).
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  if not isinstance(model, AViT):
    raise TypeError(f'expected an avit_jax.models.AViT (models.create), got {type(model).__name__}')
  if mode != 'dense' and not model.halting:
    raise ValueError(f'mode {mode!r} needs a model with halting on (model.halting=True); '
                     "use mode='dense' for a DeiT")
  chunk_size = default_chunk_size(model) if chunk_size is None else int(chunk_size)
  # Eval mode without touching the caller's module: dropout / drop path off in a view that
  # shares the parameter arrays.
  view = nnx.view(model, deterministic=True)
  if mode == 'compact':
    return CompactPredictor(view, chunk_size=chunk_size, token_buckets=token_buckets,
                            query_buckets=query_buckets)
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
  n = model.num_patches + 1
  multiple = min(8, max(1, n // 16)) if multiple is None else multiple
  depth = make_predict_fn(model, 'masked', chunk_size=chunk_size)(images).token_depth
  active = np.asarray(flops.active_tokens_per_layer(depth, model.depth))  # [B, L]
  per_layer = np.quantile(active, quantile, axis=0, method='higher')
  return tuple(int(min(n, max(multiple, -(-int(v) // multiple) * multiple))) for v in per_layer)
