"""Halting profiles for benchmarking A-ViT at ImageNet geometry without trained weights.

No trained ImageNet A-ViT weights can be downloaded here, so the benchmark builds a model
that really halts, with a compute fraction equal to the published one (A-ViT-T 0.8 of
1.3 GFLOPs, A-ViT-S 3.6 of 4.6), from random DeiT weights and synthetic images:
  * images: smooth random fields (coarse 7x7 and 28x28 noise, upsampled, plus pixel noise)
    with a per-image brightness offset and contrast, so images differ as a whole and
    patches differ within an image;
  * halting neuron: channel 0 of the patch embedding reads the patch's mean brightness
    (gain `brightness_gain`), so where a token starts depends on its content; in every
    block, channel 0 of mlp.fc2 is scaled by `spread` (the random features then move each
    token's score by a different amount) and its bias is raised by `shift`, the same in
    every block, so the residual stream carries channel 0 upwards and the score
    sigmoid(gamma * y0 - beta) rises with depth like a trained A-ViT's;
  * `shift` is found by bisection so that the mean GFLOPs of the masked model on
    calibration images (a different seed from the benchmark images) match the target.
The resulting halting is the model's own: masked and compact inference run the same
weights, so their equality and the FLOPs actually used are real, not simulated.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx

from avit_jax import models
from avit_jax.models import flops
from avit_jax.models.avit import AViT

# Published mean compute of A-ViT over DeiT on ImageNet-1K val (docs/algorithm.md).
PUBLISHED_FRACTION = {'tiny': 0.8 / 1.3, 'small': 3.6 / 4.6}
# Published gate constants (gamma, beta).
PUBLISHED_GATE = {'tiny': (10.0, 30.0), 'small': (10.0, 75.0)}


def synthetic_images(count: int, image_size: int, seed: int) -> np.ndarray:
  """float32 [count, S, S, 3], roughly normalised (mean 0, std ~1), varied per image."""
  rng = np.random.default_rng(seed)
  s = image_size

  def field(cells):
    coarse = rng.normal(size=(count, cells, cells, 3))
    reps = -(-s // cells)
    return np.kron(coarse, np.ones((1, reps, reps, 1)))[:, :s, :s]

  x = 0.6 * field(7) + 0.4 * field(28) + 0.3 * rng.normal(size=(count, s, s, 3))
  contrast = rng.uniform(0.5, 1.5, size=(count, 1, 1, 1))
  offset = rng.normal(scale=0.5, size=(count, 1, 1, 1))
  return (contrast * x + offset).astype(np.float32)


def install_profile(model: AViT, shift: float, *, brightness_gain: float = 1.0,
                    spread: float = 5.0) -> None:
  """Rewrites the halting neuron (channel 0) of `model` in place (see module doc)."""
  kernel = model.patch_embed.proj.kernel[...]  # [p, p, C, D]
  p, _, c, _ = kernel.shape
  model.patch_embed.proj.kernel[...] = kernel.at[..., 0].set(brightness_gain / (p * p * c))
  for block in model.blocks:
    fc2 = block.mlp.fc2
    fc2.kernel[...] = fc2.kernel[...].at[:, 0].multiply(spread)
    fc2.bias[...] = fc2.bias[...].at[0].set(shift)


def build(model_config: ml_collections.ConfigDict, target_fraction: float, calibration: np.ndarray,
          *, seed: int = 0, brightness_gain: float = 1.0, spread: float = 5.0,
          iterations: int = 14) -> tuple[AViT, dict]:
  """Random-weight A-ViT whose masked-model compute on `calibration` is `target_fraction`.

  Returns (model, info) with info = {shift, compute_fraction, gflops_per_image, ...}.
  """
  graphdef, pristine = nnx.split(models.create(model_config, seed=seed))
  # One compiled masked forward (eval mode) serves every trial shift.
  eval_graphdef = nnx.split(nnx.view(nnx.merge(graphdef, pristine), deterministic=True))[0]
  depth_fn = jax.jit(lambda state, x: nnx.merge(eval_graphdef, state)(x).token_depth)

  def fraction(shift):
    model = nnx.merge(graphdef, jax.tree.map(lambda a: a.copy(), pristine))
    install_profile(model, shift, brightness_gain=brightness_gain, spread=spread)
    depth = np.asarray(depth_fn(nnx.state(model), calibration))
    return flops.gflops_summary(depth, model_config)['compute_fraction'], model, depth

  # Compute falls as the shift grows; bracket then bisect.
  low, high = -1.0, 2.0
  for _ in range(iterations):
    mid = 0.5 * (low + high)
    f, _, _ = fraction(mid)
    if f > target_fraction:
      low = mid
    else:
      high = mid
  shift = 0.5 * (low + high)
  f, model, depth = fraction(shift)
  per_image = np.asarray(flops.gflops_per_image(depth, model_config))
  info = dict(shift=shift, compute_fraction=f, target_fraction=target_fraction,
              gflops_per_image=float(per_image.mean()),
              gflops_per_image_std=float(per_image.std()),
              dense_gflops=flops.dense_gflops(model_config),
              mean_depth=float(depth.mean()), token_depth_std_within_image=float(
                  depth.std(axis=1).mean()),
              brightness_gain=brightness_gain, spread=spread, seed=seed)
  return model, info

