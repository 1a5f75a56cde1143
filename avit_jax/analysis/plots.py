"""Pictures of A-ViT halting from given outputs: token-depth maps and per-layer plots.

Pure numpy in, matplotlib `Figure` out; runs no model and touches no global pyplot state
(figures are built with `matplotlib.figure.Figure`, which renders with Agg, so no display
is needed). Shapes: B images, N tokens (class token at 0, a distilled model's distillation
token at 1, then patches row-major), L layers, H x W pixels, G patches per side.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from etils import epath
from matplotlib import colormaps, colors
from matplotlib.figure import Figure

DPI = 100
DEPTH_MAP_SIZE = (9.0, 3.2)    # inches: image | depth map | overlay -> 900 x 320 px
LAYER_PLOT_SIZE = (6.0, 4.0)   # 600 x 400 px
HALTING_PLOT_SIZE = (11.0, 4.0)  # 1100 x 400 px
GRID_CELL = 1.6                # inches per image in the easiest/hardest grid


def special_tokens(num_tokens: int) -> int:
  """How many of N tokens precede the patches: 1 (the class token) or 2 (and a distilled
  model's distillation token), whichever leaves a square grid (never both for G > 1)."""
  for special in (1, 2):
    side = int(round(np.sqrt(max(num_tokens - special, 0))))
    if side > 0 and side * side == num_tokens - special:
      return special
  raise ValueError(f'expected token depths of N = 1 + G*G tokens (class token first) or '
                   f'2 + G*G (class and distillation tokens first), got N = {num_tokens}')


def patch_grid(token_depth: np.ndarray) -> np.ndarray:
  """Patch tokens of one image as a grid: float [N] -> [G, G] (special tokens dropped)."""
  token_depth = np.asarray(token_depth)
  if token_depth.ndim != 1:
    raise ValueError(f'expected the token depths of one image, [N], got shape '
                     f'{token_depth.shape}')
  patches = token_depth[special_tokens(token_depth.shape[0]):]
  side = int(round(np.sqrt(patches.shape[0])))
  return patches.reshape(side, side)


def upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """[G, G] -> [H, W]: each patch value repeated over its pixels (H, W multiples of G)."""
  g_h, g_w = grid.shape
  if height % g_h or width % g_w:
    raise ValueError(f'image size {height}x{width} is not a multiple of the patch grid '
                     f'{g_h}x{g_w}')
  return np.repeat(np.repeat(grid, height // g_h, axis=0), width // g_w, axis=1)


def to_display(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Normalised float [H, W, C] -> displayable float [H, W, C] in [0, 1] (x * std + mean)."""
  image = np.asarray(image, np.float32)
  shown = image * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(shown, 0.0, 1.0)


def _depth_style(depth: int):
  """Discrete colours, one per depth 1..L."""
  cmap = colormaps['viridis'].resampled(depth)
  norm = colors.BoundaryNorm(np.arange(0.5, depth + 1.5), depth)
  return cmap, norm


def _show_image(ax, image: np.ndarray) -> None:
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap='gray', vmin=0.0, vmax=1.0)
  else:
    ax.imshow(image)
  ax.set_xticks([])
  ax.set_yticks([])


def depth_map_figure(image: np.ndarray, token_depth: np.ndarray, depth: int, *,
                     title: str = '') -> tuple[Figure, np.ndarray]:
  """Image, its token-depth map and the map over the image, side by side.

  image: float [H, W, C] in [0, 1] (see `to_display`); token_depth: [N] (1..L); depth: L.
  Returns the figure and the [H, W] depth array drawn in the middle panel.
  """
  height, width = image.shape[:2]
  drawn = upsample(patch_grid(token_depth), height, width).astype(np.float32)
  cmap, norm = _depth_style(depth)
  fig = Figure(figsize=DEPTH_MAP_SIZE, dpi=DPI)
  axes = fig.subplots(1, 3)
  _show_image(axes[0], image)
  axes[0].set_title('image')
  shown = axes[1].imshow(drawn, cmap=cmap, norm=norm, interpolation='nearest')
  axes[1].set_xticks([])
  axes[1].set_yticks([])
  axes[1].set_title(f'token depth (mean {drawn.mean():.2f})')
  _show_image(axes[2], image)
  axes[2].imshow(drawn, cmap=cmap, norm=norm, interpolation='nearest', alpha=0.55)
  axes[2].set_title(f'overlay; class token: {int(np.asarray(token_depth)[0])}')
  bar = fig.colorbar(shown, ax=list(axes), ticks=range(1, depth + 1), fraction=0.03, pad=0.02)
  bar.set_label(f'depth, {depth} = full')
  if title:
    fig.suptitle(title)
  return fig, drawn


def depth_maps_grid_figure(images: np.ndarray, token_depth: np.ndarray, depth: int, *,
                           titles: Sequence[str] | None = None) -> tuple[Figure, np.ndarray]:
  """A row of images over a row of their depth maps (one shared colour bar), for a README.

  images: float [K, H, W, C] in [0, 1]; token_depth: [K, N]. Returns the figure and the
  depth arrays drawn, [K, H, W].
  """
  count = images.shape[0]
  height, width = images.shape[1:3]
  drawn = np.stack([upsample(patch_grid(d), height, width) for d in np.asarray(token_depth)])
  cmap, norm = _depth_style(depth)
  fig = Figure(figsize=(GRID_CELL * count + 1.0, 2 * GRID_CELL + 0.4), dpi=DPI)
  axes = np.asarray(fig.subplots(2, count, squeeze=False))
  for k in range(count):
    _show_image(axes[0, k], np.asarray(images[k]))
    if titles is not None:
      axes[0, k].set_title(titles[k], fontsize=8)
    shown = axes[1, k].imshow(drawn[k], cmap=cmap, norm=norm, interpolation='nearest')
    axes[1, k].set_xticks([])
    axes[1, k].set_yticks([])
    axes[1, k].set_title(f'mean {drawn[k].mean():.2f}', fontsize=8)
  bar = fig.colorbar(shown, ax=list(axes.ravel()), ticks=range(1, depth + 1), fraction=0.03,
                     pad=0.02)
  bar.set_label(f'depth, {depth} = full')
  return fig, drawn


def layer_statistics(token_depth: np.ndarray, halting_scores: np.ndarray) -> dict:
  """Per-layer numbers behind the plots.

  token_depth: [B, N] (1..L); halting_scores: [B, L, N].
  Returns active_fraction [B, L] (token k runs layer l iff l < depth_k), halting_mean [L]
  (mean score over images and tokens, as the prior sees it), halting_distribution [L]
  (halting_mean / its sum: the prior's D before clipping), mean_depth [B].
  """
  token_depth = np.asarray(token_depth, np.float32)
  scores = np.asarray(halting_scores, np.float32)
  if token_depth.ndim != 2 or scores.ndim != 3 or scores.shape[::2] != token_depth.shape:
    raise ValueError(f'expected token_depth [B, N] and halting_scores [B, L, N], got '
                     f'{token_depth.shape} and {scores.shape}')
  depth = scores.shape[1]
  layers = np.arange(depth)
  active = (token_depth[:, None, :] > layers[None, :, None]).mean(-1)
  halting_mean = scores.mean(axis=(0, 2))
  total = halting_mean.sum()
  return dict(active_fraction=active, halting_mean=halting_mean,
              halting_distribution=halting_mean / total if total > 0 else halting_mean,
              mean_depth=token_depth.mean(-1))


def content_depths(display_images: np.ndarray, token_depth: np.ndarray, *,
                   on: float = 0.1, background: float = 0.05, foreground: float = 0.5) -> dict:
  """How deep the patches of the object and of the background run.

  display_images: [B, H, W, C] in [0, 1] (first channel used); token_depth: [B, N], the
  special tokens first. A patch's pixels are 'on' above `on`; background patches have at most
  `background` of them on, object patches more than `foreground`. Returns the mean depth of
  each kind, their ratio (background / object: below 1 when the background halts first), the
  counts, and the correlation of patch depth with patch brightness.
  """
  images = np.asarray(display_images, np.float32)[..., 0]
  depth = np.asarray(token_depth, np.float32)
  depth = depth[:, special_tokens(depth.shape[1]):]
  b, h, w = images.shape
  side = int(round(np.sqrt(depth.shape[1])))
  p = h // side
  if side * side != depth.shape[1] or side * p != h or h != w:
    raise ValueError(f'expected square images whose patches match the tokens, got images '
                     f'{images.shape} and {depth.shape[1]} patch tokens')
  patches = images.reshape(b, side, p, side, p).transpose(0, 1, 3, 2, 4).reshape(b, side * side, -1)
  lit = (patches > on).mean(-1)
  brightness = patches.mean(-1)
  back, front = lit <= background, lit > foreground
  mean = lambda mask: float(depth[mask].mean()) if mask.any() else float('nan')  # noqa: E731
  corr = np.corrcoef(depth.ravel(), brightness.ravel())[0, 1] if depth.std() > 0 else 0.0
  return dict(background_depth=mean(back), object_depth=mean(front),
              ratio=mean(back) / mean(front) if front.any() else float('nan'),
              background_patches=int(back.sum()), object_patches=int(front.sum()),
              brightness_correlation=float(corr))


def active_tokens_figure(active_fraction: np.ndarray) -> Figure:
  """Fraction of tokens still running per layer: mean over images, 10-90 % band, min-max.

  active_fraction: [B, L]. Layers are numbered 1..L.
  """
  active = np.asarray(active_fraction)
  layers = np.arange(1, active.shape[1] + 1)
  fig = Figure(figsize=LAYER_PLOT_SIZE, dpi=DPI)
  ax = fig.subplots()
  ax.plot(layers, active.mean(0), 'o-', color='C0', label='mean over images')
  ax.fill_between(layers, np.percentile(active, 10, axis=0), np.percentile(active, 90, axis=0),
                  color='C0', alpha=0.3, label='10-90 % of images')
  ax.plot(layers, active.min(0), ':', color='C0', lw=1, label='min / max')
  ax.plot(layers, active.max(0), ':', color='C0', lw=1)
  ax.set_xlabel('layer')
  ax.set_ylabel('fraction of tokens active')
  ax.set_ylim(0.0, 1.05)
  ax.set_xticks(layers)
  ax.set_title(f'active tokens per layer ({active.shape[0]} images)')
  ax.grid(alpha=0.3)
  ax.legend(loc='lower left')
  return fig


def halting_figure(halting_scores: np.ndarray, token_depth: np.ndarray,
                   prior_target: np.ndarray | None = None) -> Figure:
  """Left: each layer's halting scores of the tokens that ran it (box plot).

  Right: the prior's view, D[l] = H[l] / sum(H) with H the mean score over all images and
  tokens, against the target on the same scale, T[l] / sum(T), when given (T itself is not
  a distribution: its sum is above 1, about 3.2 for the published prior).
  halting_scores: [B, L, N]; token_depth: [B, N]; prior_target: [L] or None.
  """
  scores = np.asarray(halting_scores, np.float32)
  stats = layer_statistics(token_depth, scores)
  depth = scores.shape[1]
  layers = np.arange(1, depth + 1)
  running = np.asarray(token_depth)[:, None, :] > np.arange(depth)[None, :, None]  # [B, L, N]
  per_layer = [scores[:, l, :][running[:, l, :]] for l in range(depth)]
  fig = Figure(figsize=HALTING_PLOT_SIZE, dpi=DPI)
  left, right = fig.subplots(1, 2)
  filled = [(l, s) for l, s in zip(layers, per_layer) if s.size]
  if filled:
    left.boxplot([s for _, s in filled], positions=[l for l, _ in filled], widths=0.6,
                 showfliers=False)
  left.set_xticks(layers)
  left.set_xlabel('layer')
  left.set_ylabel('halting score h (active tokens)')
  left.set_ylim(-0.02, 1.02)
  left.set_title('halting scores per layer')
  left.grid(alpha=0.3)
  right.bar(layers, stats['halting_distribution'], color='C1', alpha=0.7,
            label='model: H / sum(H)')
  if prior_target is not None:
    target = np.asarray(prior_target, np.float64)
    right.plot(layers, target / target.sum(), 'k.-', label='prior target: T / sum(T)')
  right.set_xticks(layers)
  right.set_xlabel('layer')
  right.set_ylabel('share of halting')
  right.set_title('halting distribution vs prior')
  right.grid(alpha=0.3)
  right.legend()
  return fig


def depth_histogram_figure(token_depth: np.ndarray, depth: int) -> Figure:
  """Histogram of every token's depth (1..L), class tokens included; token_depth [B, N]."""
  values = np.asarray(token_depth).ravel()
  fig = Figure(figsize=LAYER_PLOT_SIZE, dpi=DPI)
  ax = fig.subplots()
  ax.hist(values, bins=np.arange(0.5, depth + 1.5), rwidth=0.85, color='C2')
  ax.set_xticks(range(1, depth + 1))
  ax.set_xlabel(f'token depth (layers run, {depth} = full)')
  ax.set_ylabel('tokens')
  ax.set_title(f'token depth ({values.size} tokens, mean {values.mean():.2f})')
  ax.grid(alpha=0.3)
  return fig


def mean_depth_histogram_figure(mean_depth: np.ndarray, depth: int) -> Figure:
  """Histogram of per-image mean token depth; mean_depth [B]."""
  values = np.asarray(mean_depth)
  fig = Figure(figsize=LAYER_PLOT_SIZE, dpi=DPI)
  ax = fig.subplots()
  ax.hist(values, bins=min(30, max(5, values.size // 4)), range=(1.0, float(depth)), color='C3')
  ax.set_xlabel(f'mean token depth of an image ({depth} = full)')
  ax.set_ylabel('images')
  ax.set_title(f'per-image mean depth ({values.size} images, mean {values.mean():.2f})')
  ax.grid(alpha=0.3)
  return fig


def easiest_hardest_figure(images: np.ndarray, mean_depth: np.ndarray, *, count: int = 8,
                           labels: np.ndarray | None = None,
                           predictions: np.ndarray | None = None,
                           class_names: Sequence[str] | None = None) -> tuple[Figure, np.ndarray]:
  """Top row: the `count` images with the lowest mean depth; bottom: the highest.

  images: float [B, H, W, C] in [0, 1]; mean_depth [B]; labels / predictions int [B].
  A wrong prediction gets a red title. Returns the figure and the image indices [2, count].
  """
  mean_depth = np.asarray(mean_depth)
  count = max(1, min(count, mean_depth.size // 2))
  order = np.argsort(mean_depth, kind='stable')
  chosen = np.stack([order[:count], order[::-1][:count]])
  fig = Figure(figsize=(GRID_CELL * count, 2 * GRID_CELL + 0.6), dpi=DPI)
  axes = np.asarray(fig.subplots(2, count, squeeze=False))
  for row, name in enumerate(('easiest', 'hardest')):
    for col, index in enumerate(chosen[row]):
      ax = axes[row, col]
      _show_image(ax, np.asarray(images[index]))
      text = f'{mean_depth[index]:.2f}'
      color = 'black'
      if labels is not None:
        label = int(labels[index])
        text += '\n' + (class_names[label] if class_names else str(label))
        if predictions is not None and int(predictions[index]) != label:
          color = 'red'
      ax.set_title(text, fontsize=8, color=color)
    axes[row, 0].set_ylabel(name)
  fig.suptitle('easiest (top) and hardest (bottom) images by mean token depth'
               + ('; red: misclassified' if predictions is not None else ''), fontsize=10)
  return fig, chosen


def save(fig: Figure, path: str) -> str:
  """Writes a figure as PNG at its own size (no tight bbox, so sizes are predictable), to a
  local path or a URL such as gs:// (etils.epath)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=DPI, format='png')
  epath.Path(path).write_bytes(buffer.getvalue())
  return path
