"""Long-eval soak: memory and throughput of a predict mode over many images.

  python tools/eval_soak.py [--images 20000] [--mode compact] [--checkpoint DIR] [--json]

Runs the default config's eval split (Fashion-MNIST test, 10,000 images) through
`inference.make_predict_fn(model, mode)` pass after pass until --images images are done, and
prints, per window of --window images: resident memory now (RSS) and its peak so far
(VmHWM), images per second and the number of programs compiled so far. The first window
includes compilation; the summary compares the first warm window (the first that compiled
nothing) with the last. CPU ms per image is the steadier number on a shared machine.
With --checkpoint (a checkpoint directory or a training workdir) the model is the one
`models.load` gives; without, the config's freshly initialised model (seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from avit_jax import inference, models  # noqa: E402
from avit_jax.data import pipeline  # noqa: E402
from configs import fashion_mnist  # noqa: E402


def memory_mib() -> tuple[float, float]:
  """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
  values = {}
  with open('/proc/self/status') as f:
    for line in f:
      key, _, rest = line.partition(':')
      if key in ('VmRSS', 'VmHWM'):
        values[key] = int(rest.split()[0]) / 1024
  return values['VmRSS'], values['VmHWM']


def soak(config, model, *, images: int, window: int, mode: str, log=print) -> dict:
  """Predicts `images` eval images (repeating the split); returns per-window records and a
  summary of the first warm window (*_start) and the last (*_end): rss_*_mib, peak_*_mib,
  ips_* (images/s), cpu_ms_* (CPU ms per image), programs_* (compiled so far)."""
  predict = inference.make_predict_fn(model, mode)
  done, passes, windows = 0, 0, []
  start, start_done, cpu = time.perf_counter(), 0, time.process_time()
  while done < images:
    passes += 1
    for batch in pipeline.eval_iterator(config):
      real = int(np.asarray(batch['mask']).sum())
      out = predict(jax.numpy.asarray(batch['images']))
      jax.block_until_ready(out.logits)
      done += real
      if done - start_done >= window or done >= images:
        now, cpu_now = time.perf_counter(), time.process_time()
        rss, peak = memory_mib()
        record = {'images': done, 'pass': passes, 'rss_mib': round(rss, 1),
                  'peak_rss_mib': round(peak, 1),
                  'images_per_second': round((done - start_done) / (now - start), 1),
                  # CPU time of all threads per image: the work done, whatever else shares
                  # the machine (wall-clock img/s drops when other jobs take the cores).
                  'cpu_ms_per_image': round(1e3 * (cpu_now - cpu) / (done - start_done), 3),
                  'mean_token_depth': round(float(np.asarray(out.token_depth).mean()), 3),
                  'programs': predict.compiled_count()}  # compiled so far: flat once warm
        windows.append(record)
        log(json.dumps(record))
        start, start_done, cpu = now, done, cpu_now
      if done >= images:
        break
  # Start: the first window that compiled nothing (compact mode compiles a bucket pair the
  # first time it meets it, which can happen a few windows in).
  warm = next((w for prev, w in zip(windows, windows[1:]) if w['programs'] == prev['programs']),
              windows[-1])
  last = windows[-1]
  return {'windows': windows, 'mode': mode, 'images': done,
          'rss_start_mib': warm['rss_mib'], 'rss_end_mib': last['rss_mib'],
          'peak_start_mib': warm['peak_rss_mib'], 'peak_end_mib': last['peak_rss_mib'],
          'ips_start': warm['images_per_second'], 'ips_end': last['images_per_second'],
          'cpu_ms_start': warm['cpu_ms_per_image'], 'cpu_ms_end': last['cpu_ms_per_image'],
          'programs_start': warm['programs'], 'programs_end': last['programs']}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=20_000)
  parser.add_argument('--window', type=int, default=2_000)
  parser.add_argument('--mode', default='compact', choices=('dense', 'masked', 'compact'))
  parser.add_argument('--checkpoint', default='',
                      help='checkpoint directory or training workdir (default: init)')
  parser.add_argument('--json', action='store_true', help='print the summary as JSON')
  args = parser.parse_args()
  config = fashion_mnist.get_config()
  if args.checkpoint:
    model, _ = models.load(args.checkpoint)
  else:
    model = models.create(config.model, seed=0)
  result = soak(config, model, images=args.images, window=args.window, mode=args.mode)
  summary = {k: v for k, v in result.items() if k != 'windows'}
  if args.json:
    print('SUMMARY ' + json.dumps(summary))
  else:
    print(f"{summary['images']} images ({args.mode}): RSS {summary['rss_start_mib']:.0f} -> "
          f"{summary['rss_end_mib']:.0f} MiB, peak {summary['peak_start_mib']:.0f} -> "
          f"{summary['peak_end_mib']:.0f} MiB, {summary['ips_start']:.0f} -> "
          f"{summary['ips_end']:.0f} img/s, {summary['cpu_ms_start']:.2f} -> "
          f"{summary['cpu_ms_end']:.2f} CPU ms/image, {summary['programs_start']} -> "
          f"{summary['programs_end']} programs (first warm window -> last)")


if __name__ == '__main__':
  main()
