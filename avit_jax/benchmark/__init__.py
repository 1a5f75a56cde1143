"""Throughput and latency of dense DeiT against the A-ViT inference modes, with FLOPs.

  python -m avit_jax.benchmark [--json FILE] [--markdown FILE] [--checkpoint DIR]
      [--batch-sizes 1,8,64] [--variants tiny,small] [--latency-images 32] [--profile]
      [--quick]

For DeiT-T / DeiT-S geometry (224, 197 tokens) the A-ViT halting comes from `profiles`
(random weights calibrated to the published compute fraction); with --checkpoint, a trained
Fashion-MNIST model runs on its test images. Per mode and batch size: images/s, ms/batch,
GFLOPs/image (multiply-accumulates, docs/algorithm.md: executed by dense, used by A-ViT),
speed-up over our dense, ideal speed-up (dense FLOPs / A-ViT FLOPs), efficiency = speed-up /
ideal, the first batch's compile time (jax's ahead-of-time trace and compile) and the host
reads per forward (0: the forward is one jax program). Modes are timed round-robin in one process
(median of `--reps`), so ratios are side by side even on a busy machine, and the mode 'auto'
would pick at each batch size follows from them. Then each mode's
batch-1 latency (median and 90th percentile over `--latency-images` images, one at a time),
compact's work against what the halting needs (MLP row rounding, attention padding), with
--profile each mode's device time by phase (`phases`), and one training step
(value_and_grad of the loss) of masked A-ViT against dense DeiT.

Modules: measure (timers), report (tables), profiles (halting at ImageNet geometry), phases
(time by phase from jax.profiler), cli (what is measured for each model, and the command
line). No train import.
"""

from avit_jax.benchmark.cli import MODES, auto_picks, bench_model, main
from avit_jax.benchmark.report import format_latency, format_markdown, format_table, machine

__all__ = ['MODES', 'auto_picks', 'bench_model', 'format_latency', 'format_markdown',
           'format_table', 'machine', 'main']
