"""The benchmark's tables: text for the terminal, Markdown for a file (--markdown)."""

from __future__ import annotations

import platform

import jax

from avit_jax.benchmark import phases

PEER = 'PyTorch (transformers ViT)'


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


def _reads(r) -> str:
  return '-' if r.get('host_reads') is None else str(r['host_reads'])


def _compile(r) -> str:
  return f'{r["compile_s"]:.1f} s ({r["compile_vs_dense"]:.1f}x)'


def format_table(rows: list[dict]) -> str:
  head = (f'{"model":<24}{"mode":<10}{"batch":>6}{"img/s":>9}{"ms/batch":>10}{"GFLOPs/img":>11}'
          f'{"speed-up":>9}{"ideal":>7}{"effic.":>7}{"cpu-eff.":>9}{"compile":>15}{"reads":>6}')
  lines = [head]
  for r in rows:
    lines.append(f'{r["model"]:<24}{r["mode"]:<10}{r["batch"]:>6}{r["images_per_s"]:>9.1f}'
                 f'{r["ms_per_batch"]:>10.1f}{r["gflops_per_image"]:>11.3f}{r["speed_up"]:>9.2f}'
                 f'{r["ideal_speed_up"]:>7.2f}{r["efficiency"]:>7.2f}{r["cpu_efficiency"]:>9.2f}'
                 f'{_compile(r) if "compile_s" in r else "-":>15}{_reads(r):>6}')
  return '\n'.join(lines)


def format_latency(latency: list[dict]) -> str:
  lines = [f'{"model":<24}{"mode":<10}{"median ms":>10}{"p90 ms":>9}{"speed-up":>9}{"ideal":>7}']
  for r in latency:
    lines.append(f'{r["model"]:<24}{r["mode"]:<10}{r["median_ms"]:>10.2f}{r["p90_ms"]:>9.2f}'
                 f'{r["speed_up"]:>9.2f}{r["ideal_speed_up"]:>7.2f}')
  return '\n'.join(lines)


def format_work(rows: list[dict]) -> str:
  """Compact's computed work against what the halting needs, per batch (all layers)."""
  lines = []
  for r in rows:
    if r['mode'] == 'compact':
      w = r['work']
      lines.append(f'# {r["model"]} batch {r["batch"]}, compact ({w["layout"]} layout): MLP rows '
                   f'computed / running {w["rows_rounding"]:.3f}, attention rows '
                   f'{w["attention_rows_padding"]:.3f}, attention (sum of n^2) '
                   f'{w["attention_padding"]:.3f}; efficiency ceiling of this work '
                   f'{w["efficiency_ceiling"]:.3f}')
  return '\n'.join(lines)


def _phase_rows(rows: list[dict]):
  """(row, dense row of its batch) for every row with a phase profile."""
  dense = {(r['model'], r['batch']): r for r in rows if r['mode'] == 'dense'}
  return [(r, dense.get((r['model'], r['batch']))) for r in rows if r.get('phases')]


def _phase_cells(r, dense) -> list[str]:
  """ms per forward of each phase, and for the A-ViT modes their share of dense's."""
  cells = []
  for name in phases.PHASES + ('other',):
    ms = r['phases'][name]
    base = dense['phases'][name] if dense and dense.get('phases') else 0.0
    ratio = f' ({ms / base:.2f})' if r['mode'] != 'dense' and base > 0.05 else ''
    cells.append(f'{ms:.1f}{ratio}')
  return cells


def format_phases(rows: list[dict]) -> str:
  """Where each mode's time goes: device ms per forward by phase (its share of dense's)."""
  lines = []
  for r, dense in _phase_rows(rows):
    lines.append(f'# {r["model"]} batch {r["batch"]} {r["mode"]}: ' + ', '.join(
        f'{name} {cell}' for name, cell in zip(phases.PHASES + ('other',),
                                               _phase_cells(r, dense))))
  return '\n'.join(lines)


def format_markdown(result: dict) -> str:
  """The tables as a Markdown page: dated once at its top, with the machine and the command
  that produced it; then per model one throughput and one latency table and compact's
  work."""
  date = result.get('date', 'an unrecorded date')
  machine_ = result.get('machine', 'an unrecorded machine')
  command = result.get('command', 'python -m avit_jax.benchmark')
  out = ['# Benchmark: dense DeiT against the A-ViT inference modes', '',
         f'Measured on {date} on {machine_}, by `{command}`. docs/inference.md says how to '
         'read the tables.', '']
  auto = result.get('auto') or {}
  for model in dict.fromkeys(r['model'] for r in result['rows']):
    mine = [r for r in result['rows'] if r['model'] == model]
    out += [f'## {model}', '',
            '| batch | mode | img/s | ms/batch | GFLOPs/img | speed-up | ideal | efficiency '
            '| CPU-time efficiency | first-batch compile | host reads |',
            '|---|---|---|---|---|---|---|---|---|---|---|']
    out += [f'| {r["batch"]} | {PEER if r["mode"] == "pytorch" else r["mode"]} | '
            f'{r["images_per_s"]:.1f} | {r["ms_per_batch"]:.1f} | {r["gflops_per_image"]:.3f} | '
            f'{r["speed_up"]:.2f} | {r["ideal_speed_up"]:.2f} | {r["efficiency"]:.2f} | '
            f'{r["cpu_efficiency"]:.2f} | {_compile(r) if "compile_s" in r else "-"} | '
            f'{_reads(r)} |' for r in mine]
    lat = [r for r in result.get('latency', []) if r['model'] == model]
    if lat:
      out += ['', f'Batch-1 latency over {lat[0]["images"]} images:', '',
              '| mode | median ms | p90 ms | speed-up (median) | ideal |', '|---|---|---|---|---|']
      out += [f'| {r["mode"]} | {r["median_ms"]:.2f} | {r["p90_ms"]:.2f} | {r["speed_up"]:.2f} | '
              f'{r["ideal_speed_up"]:.2f} |' for r in lat]
    work = [r for r in mine if r['mode'] == 'compact']
    if work:
      out += ['', '| batch | layout | MLP rows computed / running | attention rows | attention '
              '(n^2) | efficiency ceiling | efficiency |', '|---|---|---|---|---|---|---|']
      out += [f'| {r["batch"]} | {r["work"]["layout"]} | {r["work"]["rows_rounding"]:.3f} | '
              f'{r["work"]["attention_rows_padding"]:.3f} | {r["work"]["attention_padding"]:.3f} | '
              f'{r["work"]["efficiency_ceiling"]:.3f} | {r["efficiency"]:.2f} |' for r in work]
    if model in auto:
      out += ['', 'Mode auto, by the speed-ups above, picks ' + ', '.join(
          f'{m} at batch {b}' for b, m in auto[model].items()) + ' (the batch of its first call).']
    profiled = _phase_rows(mine)
    if profiled:
      out += ['', 'Where the time goes: device ms per forward by phase (in brackets, the share '
              "of dense's time in that phase), from jax.profiler:", '',
              '| batch | mode | ' + ' | '.join(phases.PHASES + ('other',)) + ' |',
              '|---|---|' + '---|' * (len(phases.PHASES) + 1)]
      out += [f'| {r["batch"]} | {r["mode"]} | ' + ' | '.join(_phase_cells(r, dense)) + ' |'
              for r, dense in profiled]
    out.append('')
  return '\n'.join(out)
