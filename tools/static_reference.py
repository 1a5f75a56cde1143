"""How far `compact` is from programs compiled for one batch's exact halting.

With the benchmark's halting profile (DeiT-T or DeiT-S geometry, synthetic images), takes
one batch's token depths from the masked model and times, side by side in rounds (as the
benchmark does: the speed-up is the median of per-round ratios to dense):

  dense               the plain DeiT forward (the benchmark's dense mode)
  static-equal        every layer at the batch's mean running count, the same for every
                      image: one batched block per layer and nothing else. A bound that no
                      per-image removal reaches, as it ignores that images differ.
  static-groups       the packed layout's work without its bookkeeping: per layer, the
                      attention branch per group of images (sorted by count, in compact's
                      group sizes) at their bucketed length, then the MLP branch as one
                      matmul over the layer's running rows. Every shape is fixed in the
                      program from the depths. Each group reads what the group before
                      wrote, as in compact's loop.
  static-groups-steps the same with the MLP branch in compact's row steps
  static-groups-concurrent  static-groups with groups that do not depend on each other
                      (each reads the layer's input), which XLA may run at the same time
  compact             make_predict_fn(model, 'compact')

The static programs are compiled for this one batch and compute on the right shapes, not on
the right tokens (no gathers): they are timing references, not modes.

  .venv/bin/python tools/static_reference.py [--variant tiny] [--batch 8] [--rounds 15] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from avit_jax import config_lib, inference# noqa: E402
from avit_jax.models import flops
from avit_jax.benchmark import measure, profiles, report  # noqa: E402
from avit_jax.inference import compact as compact_lib  # noqa: E402
from avit_jax.inference import packed  # noqa: E402


def static_equal(model, counts):
  """One batched block per layer at the batch's mean running count."""
  lengths = [int(np.ceil(c.mean())) for c in counts]

  def forward(images):
    x = model.embed(images)
    for block, length in zip(model.blocks, lengths):
      x = block(x[:, :length])
    return model.forward_head(model.norm(x))
  return jax.jit(forward)


def static_groups(model, counts, plan, *, mlp_steps: bool, concurrent: bool):
  """Attention branch per group at its bucketed length, MLP branch on the running rows.

  concurrent: the groups read the layer's input and write a new buffer, so they do not
  depend on each other and XLA may run them at the same time; otherwise each group reads
  the buffer the one before wrote, as in compact's loop over groups."""
  b, n = counts[0].shape[0], model.num_tokens
  d = model.cls_token.shape[-1]
  rows_total = -(-b * n // plan.chunk_rows) * plan.chunk_rows

  def forward(images):
    rows = jnp.pad(model.embed(images).reshape(b * n, d), ((0, rows_total - b * n), (0, 0)))
    for block, count in zip(model.blocks, counts):
      count = np.sort(count)[::-1]
      offset = 0
      out = jnp.zeros_like(rows) if concurrent else rows
      # compact's groups (packed.group_starts), padded with empty slots past the batch.
      starts, numbers = packed.group_starts(count, plan.lengths, plan.groups)
      padded = np.pad(count, (0, max(plan.groups)))
      firsts = sorted((int(first + i * group), length, group)  # in row order
                      for length, group, first, number in zip(plan.lengths, plan.groups,
                                                              starts, numbers)
                      for i in range(int(number)))
      for image, length, group in firsts:
        members = padded[image:image + group]
        size = group * length
        start = min(offset, rows_total - size)
        grouped = jax.lax.dynamic_slice_in_dim(rows, start, size).reshape(-1, length, d)
        valid = jnp.arange(length)[None, :] < jnp.asarray(members)[:, None]
        y = block.attention_branch(grouped, key_mask=valid).reshape(size, d)
        out = jax.lax.dynamic_update_slice_in_dim(out, y, start, axis=0)
        offset += int(members.sum())
      rows, running = out, int(count.sum())
      if mlp_steps:
        rows = packed._token_rows(  # pylint: disable=protected-access
            lambda r, s, size, block=block: block.mlp_branch(
                jax.lax.dynamic_slice_in_dim(r, s, size)),
            rows, 0, jnp.asarray(running), plan.chunk_rows)
      else:
        rows = rows.at[:running].set(block.mlp_branch(rows[:running]))
    x = rows[:b * n].reshape(b, n, d)
    return model.forward_head(model.norm(x))
  return jax.jit(forward)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='tiny', choices=sorted(profiles.PUBLISHED_FRACTION))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--json', default='', help='write the results to this JSON file')
  args = parser.parse_args(argv)
  if args.batch < 2:
    parser.error(f'--batch must be at least 2 (the packed layout), got {args.batch}')

  mc = config_lib.model_config(args.variant)
  mc.drop_path_rate = 0.0
  mc.gate_scale, mc.gate_center = profiles.PUBLISHED_GATE[args.variant]
  calibration = profiles.synthetic_images(32, mc.image_size, 1)
  model, _ = profiles.build(mc, profiles.PUBLISHED_FRACTION[args.variant], calibration)
  # The benchmark's images: the first `batch` of its 64.
  images = jnp.asarray(profiles.synthetic_images(max(64, args.batch), mc.image_size, 2)
                       [:args.batch])
  depth = np.asarray(inference.make_predict_fn(model, 'masked')(images).token_depth)
  counts = [(depth > layer).sum(axis=1) for layer in range(model.depth)]
  compact = inference.make_predict_fn(model, 'compact')
  plan = compact_lib.CompactPredictor(model, chunk_size=0).plan(args.batch)

  programs = {'dense': inference.make_predict_fn(model, 'dense'),
              'static-equal': static_equal(model, counts),
              'static-groups': static_groups(model, counts, plan, mlp_steps=False,
                                             concurrent=False),
              'static-groups-steps': static_groups(model, counts, plan, mlp_steps=True,
                                                   concurrent=False),
              'static-groups-concurrent': static_groups(model, counts, plan, mlp_steps=False,
                                                        concurrent=True),
              'compact': compact}
  calls = {k: (lambda p=p: p(images)) for k, p in programs.items()}
  timed = measure.time_round_robin(calls, args.rounds)
  rounds = len(timed.rounds['dense'])
  ideal = flops.dense_gflops(mc) / float(np.mean(flops.gflops_per_image(depth, mc)))
  rows = []
  print(f'# {report.machine()}')
  print(f'# {args.variant}, batch {args.batch}, ideal speed-up {ideal:.2f}, '
        f'{rounds} rounds; plan {plan}')
  print('| program | ms | speed-up | efficiency | CPU-time efficiency |')
  print('|---|---|---|---|---|')
  for name in programs:
    speed_up = timed.speed_up(name, 'dense')
    cpu = timed.cpu_seconds['dense'] / timed.cpu_seconds[name]
    rows.append(dict(program=name, ms=timed.seconds[name] * 1e3, speed_up=speed_up,
                     efficiency=speed_up / ideal, cpu_efficiency=cpu / ideal))
    print(f'| {name} | {rows[-1]["ms"]:.1f} | {speed_up:.2f} | {speed_up / ideal:.3f} | '
          f'{cpu / ideal:.3f} |')
  result = dict(machine=report.machine(), variant=args.variant, batch=args.batch,
                ideal=ideal, rounds=rounds, rows=rows)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
