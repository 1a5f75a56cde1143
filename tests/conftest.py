"""Test set-up (before jax is imported): 8 fake CPU devices, one persistent compilation cache
for the session, the `slow` and `processes` markers, and the files' order."""

import collections
import os
import shutil
import sys
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests compile the same programs (the tiny training run, in this process and in the
# commands they start, which inherit the environment): a compilation cache shared by all
# of them compiles each once. A cached executable is the code a compile would give, so
# results are the same (bitwise comparisons between runs included). Every compile is
# stored, the small ones too: a started command compiles dozens of small programs (parameter
# initialisation, checkpoint transfers) that together cost it seconds.
_CACHE_DIR = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix='avit_jax_tests_jax_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE_DIR
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# Make `configs` importable however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long end-to-end run, only in `bash tools/test.sh '
                          '--all` (the default tier runs -m "not slow")')
  config.addinivalue_line('markers', 'processes: runs the training command in other processes '
                          '(the longest tests; their files are scheduled first)')


def pytest_collection_modifyitems(config, items):
  """Files with `processes` tests first, those with the most of them first. pytest-xdist
  hands out whole files in this order (tools/test.sh), so the longest start first and the
  short ones fill in around them, rather than one long file running alone at the end."""
  del config
  counts = collections.Counter(item.path for item in items
                               if item.get_closest_marker('processes'))
  items.sort(key=lambda item: -counts[item.path])  # stable: the order within each count


def pytest_unconfigure(config):
  del config
  if _CACHE_DIR:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope='session')
def fashion_mnist_dir():
  if not os.path.exists(os.path.join(FASHION_MNIST_DIR, 't10k-images-idx3-ubyte.gz')):
    raise RuntimeError(f'Fashion-MNIST IDX files missing under {FASHION_MNIST_DIR}: run '
                       '`bash tools/bootstrap.sh` (apt-get install dataset-fashion-mnist)')
  return FASHION_MNIST_DIR
