"""Multi-host for real on one machine: 2 processes x 4 CPU devices (jax.distributed, gloo)
must end with the same parameters as 1 process x 8 devices on the same global batches."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = textwrap.dedent('''
    import os, sys
    num_processes, process_id, port, devices, out, data_dir = sys.argv[1:]
    os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    import jax
    if int(num_processes) > 1:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(f'127.0.0.1:{port}', int(num_processes), int(process_id))
    import numpy as np
    from flax import nnx
    from avit_jax import config_lib, input_pipeline, sharding, train
    sys.path.insert(0, REPO_DIR)
    from tests.test_train import tiny_config
    # eps 1e-3: see test_train.test_eight_devices_and_fsdp_match_one_device.
    config = tiny_config(**{'data.data_dir': data_dir, 'optimizer.eps': 1e-3})
    program, state = train.prepare_training(config)
    if int(num_processes) > 1:
      batches = input_pipeline.train_iterator(config)  # this host's shard only
    else:  # the same global batches: host 0's shard, then host 1's
      shards = [input_pipeline.train_iterator(config, process_index=i, process_count=2)
                for i in range(2)]
      batches = ({k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
                 for parts in zip(*shards))
    losses = []
    for _ in range(3):
      batch = sharding.global_batch(next(batches), program.mesh)
      state, metrics = program.train_step(state, batch)
      losses.append(float(metrics['loss']))
    params = config_lib.flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)))
    if jax.process_index() == 0:
      np.savez(os.path.join(out, f'result{num_processes}.npz'), losses=np.array(losses), **params)
    print('done', jax.process_index(), jax.device_count(), losses)
''').replace('REPO_DIR', repr(REPO))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run(num_processes, devices, out, data_dir):
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen([sys.executable, '-c', DRIVER, str(num_processes), str(i), str(port),
                             str(devices), str(out), data_dir], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(num_processes)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return np.load(os.path.join(out, f'result{num_processes}.npz'))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path, fashion_mnist_dir):
  two = _run(2, 4, tmp_path, fashion_mnist_dir)
  one = _run(1, 8, tmp_path, fashion_mnist_dir)
  assert two['losses'][0] != two['losses'][1]  # really different batches each step
  np.testing.assert_allclose(two['losses'], one['losses'], rtol=1e-5)
  assert set(two.files) == set(one.files)
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], rtol=1e-5,
                               atol=1e-5 * np.abs(one[name]).max(), err_msg=name)
