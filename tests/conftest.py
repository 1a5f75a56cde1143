"""Test set-up: 8 fake CPU devices (set before jax is imported) and the `slow` marker."""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Make `configs` importable however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long test (CI runs it; -m "not slow" skips)')
  config.addinivalue_line('markers', 'multiprocess: starts several Python processes')


@pytest.fixture(scope='session')
def fashion_mnist_dir():
  if not os.path.exists(os.path.join(FASHION_MNIST_DIR, 't10k-images-idx3-ubyte.gz')):
    raise RuntimeError(f'Fashion-MNIST IDX files missing under {FASHION_MNIST_DIR}: run '
                       '`bash tools/bootstrap.sh` (apt-get install dataset-fashion-mnist)')
  return FASHION_MNIST_DIR
