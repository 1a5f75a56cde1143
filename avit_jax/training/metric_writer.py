"""What a run reports into its workdir: TensorBoard scalars (tensorboardX event files) and
eval.json, written by process 0 only, and the train / eval log lines."""

from __future__ import annotations

import os
import sys
import time

from absl import logging

from avit_jax.training.workdir import EVAL_FILE, write_json


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch. tensorboardX imports torch
  whenever it is installed (the `torch` extra, for conversion) only to accept torch tensors,
  which a run never logs; loading torch would slow every run's start and enlarge its memory."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None  # makes `import torch` raise ImportError, for this import only
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  """`scalars(step, {name: value})`, and the reports of a logged step and of an evaluation;
  files are written only when `enabled` (process 0), TensorBoard events only with `events`
  (a diagnostic evaluation adds nothing to the run's curves)."""

  def __init__(self, workdir: str, enabled: bool, *, events: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    if enabled and events:
      self._tb = _summary_writer_class()(workdir)

  def scalars(self, step: int, values: dict) -> None:
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, float(value), step)
      self._tb.flush()

  def train_step(self, step: int, total: int, metrics: dict, *, epoch: float,
                 images_per_second: float | None, eta_seconds: float | None,
                 nonfinite_steps: int) -> None:
    """Scalars train/* and the log line of a logged step (metrics already on the host).
    images_per_second / eta_seconds: None when no step since the last report was timed (the
    first step of a run compiles)."""
    timed = {} if images_per_second is None else {'train/images_per_second': images_per_second}
    self.scalars(step, {f'train/{k}': v for k, v in metrics.items()} | timed |
                 {'train/nonfinite_steps': nonfinite_steps})
    speed = '-' if images_per_second is None else f'{images_per_second:.0f}'
    eta = '-' if eta_seconds is None else time.strftime('%H:%M:%S', time.gmtime(eta_seconds))
    distill = metrics.get('distill_loss', 0.0)
    terms = f'ce {metrics["ce"]:.4f}' + (f' distill {distill:.4f}' if distill else '')
    logging.info('step %d/%d epoch %.2f | loss %.4f (%s ponder %.5f prior %.5f) | '
                 'depth %.2f compute %.0f%% | lr %.2e | %s img/s | ETA %s', step, total, epoch,
                 metrics['loss'], terms, metrics['ponder_loss'], metrics['prior_loss'],
                 metrics['mean_token_depth'], 100 * metrics['remaining_compute'], metrics['lr'],
                 speed, eta)

  def evaluation(self, metrics: dict, *, split: str, depth: int, path: str | None = None) -> None:
    """`path` (default WORKDIR/eval.json, replaced atomically), scalars eval/<split>/* and
    one log line."""
    if self.enabled:
      write_json(path or os.path.join(self.workdir, EVAL_FILE), metrics)
    self.scalars(metrics['step'], {
        f'eval/{split}/top1': metrics['top1'], f'eval/{split}/top5': metrics['top5'],
        f'eval/{split}/loss': metrics['eval_loss'],
        f'eval/{split}/mean_token_depth': metrics['mean_token_depth'],
        f'eval/{split}/gflops': metrics['gflops_per_image'],
        f'eval/{split}/images_per_second': metrics['images_per_second']})
    logging.info('eval step %d: top1 %.4f top5 %.4f loss %.4f depth %.2f/%d GFLOPs %.4f '
                 '(%.0f%% of dense) %.0f img/s', metrics['step'], metrics['top1'],
                 metrics['top5'], metrics['eval_loss'], metrics['mean_token_depth'], depth,
                 metrics['gflops_per_image'], 100 * metrics['compute_fraction'],
                 metrics['images_per_second'])

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
