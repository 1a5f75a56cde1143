"""The multi-host command for real on one machine: `python -m avit_jax.main` as 2 processes x
2 CPU devices (jax.distributed with gloo collectives) sharing one workdir through the faults
a pod meets, against 1 process x 4 devices on the same global batches (`data.shards=2`).
Every process has a deadline, so a hang fails the test instead of stalling the suite."""

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from avit_jax import checkpoints, command_line, config_lib, distributed, models
from avit_jax.training import train
from tests.helpers import REPO, STALL_FINALIZE, CommandRun

DEADLINE_S = 300  # for one launch of the command, compile and all
# JAX stops the survivors of a dead process after this many seconds without its heartbeat.
HEARTBEAT_S = 5
STEPS = 12  # of the runs compared with the reference run
FSDP = ['--config.mesh.fsdp=4']  # every array split over the 4 devices of a run

pytestmark = pytest.mark.processes


def _flags(workdir, data_dir, steps: int, extra=()) -> list[str]:
  return ['--config', os.path.join(REPO, 'configs', 'fashion_mnist.py'), '--workdir', str(workdir),
          f'--config.data.data_dir={data_dir}', '--config.data.shards=2',
          '--config.model.dim=32', '--config.model.depth=3', '--config.model.heads=2',
          '--config.loss.prior_target_depth=2', '--config.batch_size=32',
          '--config.eval_batch_size=64', f'--config.num_train_steps={steps}',
          '--config.num_eval_images=256', '--config.log_every_steps=1',
          f'--config.eval_every_steps={steps}', '--config.checkpoint_every_steps=4',
          '--config.optimizer.warmup_epochs=0.0', '--config.optimizer.lr=3e-2', *extra]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Launch:
  """One run of the command: `num_processes` processes (1: no jax.distributed flags), each
  with `devices` fake CPU devices."""

  def __init__(self, workdir, data_dir, *, num_processes: int, devices: int, steps: int,
               extra=(), tag: str = 'run', process_extra=None, env=None, stall: int = 0):
    """`stall`: process 0 stalls in the atomic finalisation of that step's checkpoint
    (helpers.STALL_FINALIZE, its marker file in `env`)."""
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED='1',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', **(env or {}))
    port = _free_port()
    self.procs = []
    for i in range(num_processes):
      args = [*_flags(workdir, data_dir, steps, extra), *(process_extra or {}).get(i, ())]
      if num_processes > 1:
        args += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={num_processes}',
                 f'--process_id={i}', f'--heartbeat_timeout={HEARTBEAT_S}']
      start, process_env = None, env
      if stall and i == 0:
        start = [sys.executable, '-c', STALL_FINALIZE]
        process_env = env | {'STALL_STEP': str(stall)}
      self.procs.append(CommandRun(args, env=process_env, start=start, name=f'{tag}, process {i}'))

  def log(self, i: int) -> str:
    return self.procs[i].output

  def wait_for_line(self, i: int, text: str) -> None:
    """Until process i prints `text` (every process killed if it never does)."""
    try:
      self.procs[i].wait_for(re.escape(text), DEADLINE_S)
    finally:
      if self.procs[i].proc.poll() is not None:
        self.kill()

  def wait(self, timeout: float = DEADLINE_S) -> list[int]:
    """Exit codes, after every process ended (all killed, and the test failed, at `timeout`)."""
    deadline = time.monotonic() + timeout
    try:
      return [p.finish(max(deadline - time.monotonic(), 1)) for p in self.procs]
    finally:
      self.kill()

  def kill(self) -> None:
    for p in self.procs:
      p.kill()

  def succeed(self) -> None:
    codes = self.wait()
    for i, code in enumerate(codes):
      assert code == 0, f'process {i} exited {code}:\n{self.log(i)[-3000:]}'


def _eval(workdir) -> dict:
  with open(os.path.join(workdir, 'eval.json')) as f:
    return json.load(f)


def _assert_same_metrics(a: dict, b: dict) -> None:
  """The same model on the same images: exact counts and depths, the loss to float rounding
  (the processes add their partial sums in another order)."""
  for key in ('step', 'num_images', 'top1', 'top5'):
    assert a[key] == b[key], (key, a[key], b[key])
  for key in ('mean_token_depth', 'gflops_per_image', 'eval_loss'):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(a['active_token_fraction_per_layer'],
                             b['active_token_fraction_per_layer'], rtol=1e-6)


def _stopped_step(log: str) -> int:
  line = next(l for l in log.splitlines() if 'SIGTERM: stopped at step' in l)
  return int(line.split('stopped at step ')[1].split()[0])


def _steps(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def _params(model) -> dict:
  return config_lib.flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def _verify(path) -> tuple[int, str]:
  """`python -m avit_jax.checkpoints verify path`, in this process: (exit status, stdout)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = checkpoints.main(['verify', str(path)])
  return code, out.getvalue()


def _config(data_dir, **overrides):
  """The launches' config (STEPS steps), as the command builds it from the same flags."""
  config = command_line.load_config(os.path.join(REPO, 'configs', 'fashion_mnist.py'),
                                    _flags('unused', data_dir, STEPS, FSDP)[4:])
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope='module')
def single(tmp_path_factory, fashion_mnist_dir):
  """1 process x 4 devices, STEPS steps: the reference run (in this process, on 4 of its
  devices: the program the command compiles for 4 devices)."""
  workdir = tmp_path_factory.mktemp('single') / 'run'
  train.train_and_evaluate(_config(fashion_mnist_dir, write_depth_maps=False), str(workdir),
                           devices=jax.devices()[:4])
  return workdir


@pytest.fixture(scope='module')
def pod(tmp_path_factory, fashion_mnist_dir):
  """2 processes x 2 devices on one workdir, every array split over both (FSDP), through
  the faults a pod meets, each run started with the same commands:

  1. `stopped`: SIGTERM to process 1 after step 2; both processes save and exit.
  2. `stalled`: resumes; is held still, idle, where process 0 finalises its last checkpoint
     (after every process wrote its arrays); `second`, another run on the workdir, is
     refused; kill -9 of process 1 stops process 0 on JAX's heartbeat.
  3. A byte flipped in the newest complete checkpoint's shard that only process 1 wrote;
     `verify` finds it.
  4. `resumed`: falls back past it to the newest intact step and finishes the run.
  """
  root = tmp_path_factory.mktemp('pod')
  workdir, marker = root / 'run', root / 'stalled'
  launch = lambda tag, extra=(), **kw: Launch(workdir, fashion_mnist_dir, num_processes=2,
                                              devices=2, steps=STEPS, extra=[*FSDP, *extra],
                                              tag=tag, **kw)
  found = {'workdir': workdir}
  found['stopped'] = stopped = launch('stopped', extra=['--config.write_depth_maps=False'])
  stopped.wait_for_line(1, f'step 2/{STEPS}')
  stopped.procs[1].signal(signal.SIGTERM)
  assert stopped.wait() == [143, 143], (stopped.log(0)[-2000:], stopped.log(1)[-2000:])

  found['stalled'] = stalled = launch('stalled', env={'STALL_MARKER': str(marker)}, stall=STEPS)
  try:
    stalled.procs[0].wait_for_file(str(marker), DEADLINE_S)
  finally:
    if not marker.exists():
      stalled.kill()
  found['second'] = second = launch('second')
  found['second_codes'] = second.wait()
  stalled.procs[1].signal(signal.SIGKILL)
  killed_at = time.monotonic()
  found['stalled_codes'] = stalled.wait(timeout=HEARTBEAT_S + 60)
  found['stop_s'] = time.monotonic() - killed_at

  found['steps'] = steps = _steps(workdir)
  assert len(steps) >= 2 and steps[-1] < STEPS, steps  # the last step was never finalised
  data = workdir / 'checkpoints' / str(steps[-1]) / 'params' / 'ocdbt.process_1' / 'd'
  target = max(data.iterdir(), key=lambda p: p.stat().st_size)
  raw = bytearray(target.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  target.write_bytes(bytes(raw))
  found['verify'] = _verify(workdir)

  found['resumed'] = launch('resumed')
  found['resumed'].succeed()
  return found


def test_sigterm_to_one_process_stops_every_process_at_one_step(single, pod):
  stopped = {_stopped_step(pod['stopped'].log(i)) for i in (0, 1)}
  assert len(stopped) == 1, stopped  # the same step on both
  step = stopped.pop()
  assert 2 <= step < STEPS
  assert f'resumed from {pod["workdir"]}/checkpoints/{step}' in pod['stalled'].log(0)
  # The same commands resumed (twice) and ended where an uninterrupted one-process run ends.
  _assert_same_metrics(_eval(pod['workdir']), _eval(single))


def test_a_second_run_is_refused_a_dead_process_stops_the_other_and_a_damaged_shard_is_found(
    pod):
  workdir, second, stalled, resumed = pod['workdir'], pod['second'], pod['stalled'], pod['resumed']
  # Another run on the same workdir: every one of its processes is refused, with the reason.
  assert pod['second_codes'] == [1, 1]
  for i in (0, 1):
    assert 'another run (pid' in second.log(i) and 'is using workdir' in second.log(i)
  # kill -9 of one process: the other stops on JAX's heartbeat, with a message, in bounded time.
  assert pod['stalled_codes'][0] != 0
  assert pod['stop_s'] < HEARTBEAT_S + 60
  assert 'another task died' in stalled.log(0) or 'Gloo' in stalled.log(0), stalled.log(0)[-3000:]
  # verify finds the flipped byte in the newest complete step.
  steps = pod['steps']
  newest, intact = steps[-2:][::-1]
  code, out = pod['verify']
  assert code == 1, out
  assert f'{workdir}/checkpoints/{newest}: DAMAGED' in out
  assert f'{len(steps) - 1} of {len(steps)} checkpoint(s) intact, 1 damaged' in out
  # The same commands resumed, every process from the newest intact step, and wrote the
  # damaged step and the unfinished one anew.
  for i in (0, 1):
    assert f'resuming from step {intact}, the newest intact checkpoint' in resumed.log(i)
  assert f'resumed from {workdir}/checkpoints/{intact}' in resumed.log(0)
  assert 'moved damaged checkpoint' in resumed.log(0)
  assert _steps(workdir)[-2:] == [8, 12]
  assert not list((workdir / 'checkpoints').glob('*tmp*'))


def test_two_processes_train_evaluate_and_write_figures_as_one(single, pod, fashion_mnist_dir):
  workdir, resumed = pod['workdir'], pod['resumed']
  assert _eval(workdir)['num_images'] == 256
  # Process 0 alone writes the figures (from parameters no process holds whole),
  # config.json, eval.json and events (one file a launch).
  assert 'wrote 16 figures' in resumed.log(0) and 'figures' not in resumed.log(1)
  assert len(os.listdir(workdir / 'figures' / 'depth_maps')) == 8
  assert len([n for n in os.listdir(workdir) if n.startswith('events.out.tfevents')]) == 3
  # Its checkpoints read and verify in one process, and evaluate to the same metrics there
  # on one device.
  code, out = _verify(workdir)
  count = len(_steps(workdir))
  assert code == 0 and f'{count} of {count} checkpoint(s) intact' in out, out
  metrics = train.train_and_evaluate(_config(fashion_mnist_dir, mode='eval', **{'mesh.fsdp': 1}),
                                     str(workdir), devices=jax.devices()[:1])
  _assert_same_metrics(metrics, _eval(single))
  _assert_same_metrics(_eval(workdir), _eval(single))  # and wrote them
  # The loader of visualize, tradeoff and the benchmark reads it: the parameters trained on
  # two processes are those trained on one, to the rounding of sums taken in another order
  # (which Adam's normalisation enlarges for parameters whose gradients are near zero).
  pod_params = _params(models.load(str(workdir))[0])
  single_params = _params(models.load(str(single))[0])
  assert pod_params.keys() == single_params.keys()
  for name, value in single_params.items():
    np.testing.assert_allclose(pod_params[name], value, rtol=1e-3,
                               atol=1e-3 * np.abs(value).max(), err_msg=name)


def test_an_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path, fashion_mnist_dir):
  port = _free_port()  # nobody listens there
  command = [sys.executable, '-m', 'avit_jax.main',
             *_flags(tmp_path / 'run', fashion_mnist_dir, STEPS),
             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--process_id=1',
             '--initialization_timeout=3']
  start = time.monotonic()
  done = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=DEADLINE_S)
  assert done.returncode == 1
  assert time.monotonic() - start < 60
  assert done.stderr.strip().splitlines()[-1] == (
      f'error: cannot reach the coordinator at 127.0.0.1:{port} within 3 s ([Errno 111] '
      'Connection refused); start process 0 with the same --coordinator_address, check that '
      'this host can reach it, or raise --initialization_timeout')
  assert 'Traceback' not in done.stderr
  assert not (tmp_path / 'run').exists()  # it stopped before touching the workdir
  # Some of the three flags but not all: refused before anything starts (the command prints
  # the message after "error: ", as above).
  with pytest.raises(distributed.DistributedError) as partial:
    distributed.initialize(f'127.0.0.1:{port}', 2, None)
  assert str(partial.value) == (
      '--coordinator_address, --num_processes and --process_id go together: give all three '
      '(or none, on SLURM or a TPU pod)')


def test_processes_started_with_different_configs_all_stop(tmp_path, fashion_mnist_dir):
  workdir = tmp_path / 'pod'
  run = Launch(workdir, fashion_mnist_dir, num_processes=2, devices=2, steps=STEPS,
               process_extra={1: ['--config.optimizer.lr=1e-2']})
  assert run.wait() == [1, 1]
  for i in (0, 1):
    assert ('error: the processes of this run were started with different configs; give every '
            'process the same --config and --config.* flags') in run.log(i).splitlines()
    assert 'Traceback' not in run.log(i)
  assert not workdir.exists()  # refused before the workdir was made
