"""The benchmark's tables: text for the terminal, Markdown for the README."""

from __future__ import annotations

import platform

import jax


def format_time_split(split: dict) -> str:
  ms = split['ms']
  return (f'# compact, synchronised after every call: embed {ms["embed"]:.1f} ms, blocks '
          f'{ms["blocks"]:.1f} ms ({split["block_calls"]} calls), repack {ms["repack"]:.1f} ms, '
          f'finish {ms["finish"]:.1f} ms; blocks at dense speed per FLOP '
          f'{split["blocks_ideal_ms"]:.1f} ms (block efficiency {split["block_efficiency"]:.2f}); '
          f'rows computed / running {split["rows_rounding"]:.3f}, attention computed / running '
          f'{split["attention_padding"]:.3f}')


def format_table(rows: list[dict]) -> str:
  head = (f'{"model":<24}{"mode":<9}{"batch":>6}{"img/s":>9}{"ms/batch":>10}{"GFLOPs/img":>11}'
          f'{"speed-up":>9}{"ideal":>7}{"effic.":>7}{"cpu-ms":>9}{"cpu-effic.":>11}')
  lines = [head]
  for r in rows:
    lines.append(f'{r["model"]:<24}{r["mode"]:<9}{r["batch"]:>6}{r["images_per_s"]:>9.1f}'
                 f'{r["ms_per_batch"]:>10.1f}{r["gflops_per_image"]:>11.3f}{r["speed_up"]:>9.2f}'
                 f'{r["ideal_speed_up"]:>7.2f}{r["efficiency"]:>7.2f}'
                 f'{r["cpu_ms_per_batch"]:>9.1f}{r["cpu_efficiency"]:>11.2f}')
  return '\n'.join(lines)


def format_markdown(rows: list[dict]) -> str:
  """The rows as one Markdown table per model (the README's tables), each followed by the
  compact time split of every batch size."""
  names = {'pytorch': 'PyTorch (transformers ViT)'}
  out = []
  for model in dict.fromkeys(r['model'] for r in rows):
    mine = [r for r in rows if r['model'] == model]
    out += [f'{model}:', '',
            '| batch | mode | img/s | ms/batch | GFLOPs/img | speed-up | ideal | efficiency '
            '| CPU-time efficiency |', '|---|---|---|---|---|---|---|---|---|']
    out += [f'| {r["batch"]} | {names.get(r["mode"], r["mode"])} | {r["images_per_s"]:.1f} | '
            f'{r["ms_per_batch"]:.1f} | {r["gflops_per_image"]:.3f} | {r["speed_up"]:.2f} | '
            f'{r["ideal_speed_up"]:.2f} | {r["efficiency"]:.2f} | {r["cpu_efficiency"]:.2f} |'
            for r in mine]
    out += ['', '| batch | embed ms | blocks ms (calls) | repack ms | blocks at dense speed per '
            'FLOP, ms | block efficiency | rows computed / running | attention computed / '
            'running |', '|---|---|---|---|---|---|---|---|']
    for r in mine:
      if r['mode'] == 'compact':
        t = r['time_split']
        out.append(f'| {r["batch"]} | {t["ms"]["embed"]:.1f} | {t["ms"]["blocks"]:.1f} '
                   f'({t["block_calls"]}) | {t["ms"]["repack"]:.1f} | {t["blocks_ideal_ms"]:.1f}'
                   f' | {t["block_efficiency"]:.2f} | {t["rows_rounding"]:.3f} | '
                   f'{t["attention_padding"]:.3f} |')
    out.append('')
  return '\n'.join(out)


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    cpu = f'{names[0]} x{len(names)}' if names else cpu
  except OSError:
    pass
  devices = ', '.join(sorted({d.device_kind for d in jax.devices()}))
  return f'{cpu}; jax {jax.__version__} on {jax.default_backend()} ({devices})'
