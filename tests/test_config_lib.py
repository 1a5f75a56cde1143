"""Configs stay plain: what config_lib and configs/*.py import (read with ast, imports inside
functions included), every config validates, and the dotted names of a nested tree."""

import ast
import glob
import os
import sys

import ml_collections
import numpy as np
import pytest

from avit_jax import config_lib
from avit_jax.training import validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def _imports(path: str) -> set[str]:
  """Every module an `import` or `from ... import` anywhere in the file names."""
  modules = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      modules.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      modules.update(f'{base}.{alias.name}' if base == 'avit_jax' else base
                     for alias in node.names)
  return modules


def test_config_lib_imports_only_ml_collections_and_the_standard_library():
  imported = _imports(os.path.join(REPO, 'avit_jax', 'config_lib.py'))
  assert 'ml_collections' in imported
  others = {m for m in imported if m.split('.')[0] not in sys.stdlib_module_names}
  assert others == {'ml_collections'}, others


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_files_import_only_config_lib(path):
  imported = _imports(path)
  assert imported <= {'avit_jax.config_lib'}, imported
  if os.path.basename(path) != '__init__.py':
    assert imported == {'avit_jax.config_lib'}


@pytest.mark.parametrize('name', ['tiny', 'small', 'base', 'fashion_mnist'])
def test_every_config_validates(name):
  module = __import__(f'configs.{name}', fromlist=['get_config'])
  config = module.get_config()
  validation.validate_config(config, device_count=1)
  assert config.mode in config_lib.RUN_MODES


def test_flatten_names_leaves_by_their_dotted_path():
  tree = {'blocks': {0: {'w': np.ones(2)}, 1: {'w': np.zeros(3)}}, 'head': {'b': None},
          'mean': (0.1, 0.2)}
  flat = config_lib.flatten(tree)
  assert list(flat) == ['blocks.0.w', 'blocks.1.w', 'head.b', 'mean']
  assert flat['mean'] == (0.1, 0.2) and flat['head.b'] is None  # tuples and None are leaves
  np.testing.assert_array_equal(flat['blocks.1.w'], np.zeros(3))
  config = ml_collections.ConfigDict({'a': {'b': 1}, 'c': 'x'})
  assert config_lib.flatten(config) == {'a.b': 1, 'c': 'x'}
