"""Throughput of dense DeiT vs the A-ViT inference modes, with FLOPs and a PyTorch peer row.

  python -m avit_jax.benchmark [--json FILE] [--markdown FILE] [--checkpoint DIR]
      [--batch-sizes 1,8,64] [--quick]

For DeiT-T / DeiT-S geometry (224, 197 tokens) the A-ViT halting comes from
`halting_profiles` (random weights calibrated to the published compute fraction); with
--checkpoint, a trained model (e.g. the Fashion-MNIST default) runs on its test images.
Columns: images/s, ms/batch, GFLOPs/image (multiply-adds, AVIT.md convention: executed by
dense, used by A-ViT), speed-up over our dense, ideal speed-up (dense FLOPs / A-ViT FLOPs)
and efficiency = speed-up / ideal. Modes are timed round-robin in one process (median of
`--reps`), so ratios are side by side even on a busy machine. Also times one training
step (value_and_grad of the loss) of masked A-ViT against dense DeiT. No train import.
Where compact's time goes: after each table, a profiled compact run (synchronised after every
call) splits its time into embedding, blocks, repack and head, and sets the blocks against
dense's time scaled by the block FLOPs compact needs (block efficiency), with the rows and
attention computed over those needed (bucket rounding, attention padding).

Modules: rows (one model's rows, compact's time split, capacity's check), timing (round-robin
timer, PyTorch peer, training step), fashion_mnist (the trained default model's images,
checkpoint and capacity accuracy), tables (text and Markdown), cli (the command line).
"""

from avit_jax.benchmark.rows import MODES, bench_model, capacity_check, compact_time_split
from avit_jax.benchmark.tables import format_markdown, format_table, format_time_split, machine
from avit_jax.benchmark.cli import main  # after rows and tables, which it imports

__all__ = ['MODES', 'bench_model', 'capacity_check', 'compact_time_split', 'format_markdown',
           'format_table', 'format_time_split', 'machine', 'main']
