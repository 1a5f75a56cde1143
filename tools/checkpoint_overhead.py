"""What the checkpoint checksums cost: per checkpoint, for DeiT-T (configs/tiny.py: 5.7M
parameters plus AdamW's two moments) and the default Fashion-MNIST model.

For each model: the checksum of every array (host copies + crc32), the time a training step
waits for an asynchronous save (TrainCheckpoints.save returning) with and without checksums,
a whole synchronous save with and without, and on load the verification part of
`load_params`. Medians over --repeats saves into a temporary directory.

  taskset -c 1 .venv/bin/python tools/checkpoint_overhead.py [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from flax import nnx  # noqa: E402

from avit_jax.checkpoints import integrity  # noqa: E402
from avit_jax import checkpoints, models# noqa: E402
from avit_jax.training import optim, train
from configs import fashion_mnist, tiny  # noqa: E402


def _state(config):
  """Step-0 train state (params, AdamW state) of config's model, on the default device."""
  _, params = train.split_model(models.create(config.model, seed=0))
  schedule = optim.schedule(config.optimizer, config.batch_size, 1000, 100)
  state = train.create_train_state(params, optim.make_optimizer(config.optimizer, schedule),
                                   ema=False)
  return jax.device_put(state)


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(name: str, config, repeats: int) -> dict:
  state = _state(config)
  pure = nnx.to_pure_dict(state.params)
  leaves = jax.tree.leaves((pure, state.opt_state))
  result = {'model': name, 'arrays': len(leaves),
            'parameters': int(sum(np.size(x) for x in jax.tree.leaves(pure))),
            'megabytes': round(sum(x.nbytes for x in leaves) / 2**20, 1)}
  result['checksum_s'] = _median_seconds(
      lambda: integrity.checksum_field({'params': pure, 'opt_state': state.opt_state}), repeats)

  real = integrity.checksum_field
  empty = lambda items: {'algorithm': integrity.ALGORITHM, 'arrays': {}}
  with tempfile.TemporaryDirectory() as tmp:
    for label, async_save in (('async_blocking', True), ('sync', False)):
      for checksums in (True, False):
        integrity.checksum_field = real if checksums else empty
        manager = checkpoints.TrainCheckpoints(os.path.join(tmp, f'{label}{checksums}'),
                                               keep=repeats + 1, async_save=async_save)
        steps = iter(range(1, 10**6))

        def save():
          manager.save(next(steps), params=state.params, opt_state=state.opt_state,
                       ema_params=None, train={'step': 0}, metadata={})
        save()  # warm-up: the first save sets orbax up
        manager.wait()
        times = []
        for _ in range(repeats):
          start = time.perf_counter()
          save()
          times.append(time.perf_counter() - start)
          manager.wait()  # the next measured save starts from an idle manager
        manager.close()
        result[f'save_{label}_{"with" if checksums else "without"}_s'] = statistics.median(times)
    integrity.checksum_field = real
    step_dir = checkpoints.save_params(os.path.join(tmp, 'params'), pure, {})
    loaded, _ = checkpoints.load_params(step_dir)
    result['load_params_s'] = _median_seconds(lambda: checkpoints.load_params(step_dir), repeats)
    result['verify_on_load_s'] = _median_seconds(lambda: integrity.tree_checksums(loaded),
                                                 repeats)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--json', action='store_true', help='print one JSON line per model')
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  print(f'JAX {jax.__version__}, {jax.devices()[0].platform}, {jax.device_count()} device(s); '
        f'medians of {args.repeats}')
  for name, config in (('DeiT-T (configs/tiny.py)', tiny.get_config()),
                       ('Fashion-MNIST default (configs/fashion_mnist.py)',
                        fashion_mnist.get_config())):
    r = measure(name, config, args.repeats)
    if args.json:
      print(json.dumps(r))
      continue
    ms = lambda key: f'{1e3 * r[key]:.1f} ms'
    print(f'\n{name}: {r["parameters"]:,} parameters, {r["arrays"]} arrays with AdamW, '
          f'{r["megabytes"]} MiB')
    print(f'  checksums of every array (host copy + crc32): {ms("checksum_s")}')
    print(f'  async save, time the step waits: {ms("save_async_blocking_with_s")} with, '
          f'{ms("save_async_blocking_without_s")} without')
    print(f'  synchronous save, whole write:   {ms("save_sync_with_s")} with, '
          f'{ms("save_sync_without_s")} without')
    print(f'  load_params {ms("load_params_s")}, of which verifying {ms("verify_on_load_s")}')


if __name__ == '__main__':
  main()
