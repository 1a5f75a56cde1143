"""The Colab notebooks: committed without outputs, and executed (nbclient) so they cannot rot.

quickstart.ipynb runs end to end on CPU with SMOKE = True (a few training steps);
imagenet_finetune_tpu.ipynb runs up to the cell that needs ImageNet (a random DeiT-T file
stands in for the download) and must stop there with its message.
"""

import ast
import json
import os
import re
import sys

import nbformat
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, 'colab')
NOTEBOOKS = ('quickstart.ipynb', 'imagenet_finetune_tpu.ipynb')
KERNEL = 'avit-jax-test'
# What a notebook may use: the documented commands (README, docs/) and the documented Python
# API, the trainer's excepted (a notebook trains through the command, as a user does).
PUBLIC_COMMANDS = {'avit_jax.main', 'avit_jax.visualize', 'avit_jax.convert',
                   'avit_jax.benchmark', 'avit_jax.tradeoff', 'avit_jax.checkpoints',
                   'avit_jax.input_pipeline'}
PUBLIC_MODULES = {'avit_jax', 'avit_jax.models', 'avit_jax.inference', 'avit_jax.checkpoints',
                  'avit_jax.convert', 'avit_jax.visualize', 'avit_jax.command_line',
                  'avit_jax.data.pipeline', 'avit_jax.analysis.figures',
                  'avit_jax.analysis.plots', 'avit_jax.configs'}


def _read(name):
  return nbformat.read(os.path.join(COLAB, name), as_version=4)


def _parameters_cell(nb):
  tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, 'exactly one cell must be tagged "parameters"'
  return tagged[0]


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_clean_and_says_runtime_and_duration(name):
  nb = _read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.outputs == [] and c.execution_count is None for c in code), (
      f'{name} carries outputs: clear them before committing')
  first = nb.cells[0]
  assert first.cell_type == 'markdown'
  assert '**Runtime:**' in first.source and '**Duration:**' in first.source
  params = _parameters_cell(nb)
  assert nb.cells.index(params) == 1, 'the parameters cell comes right after the title'
  for name_ in ('SMOKE', 'INSTALL', 'WORKDIR', 'NUM_TRAIN_STEPS'):
    assert f'\n{name_} = ' in '\n' + params.source
  # Public CLI and API only: every command it runs is a public `python -m avit_jax.<module>`,
  # every avit_jax module it imports (in any form) is a public one.
  source = '\n'.join(c.source for c in code)
  commands = set(re.findall(r"-m['\"]?,?\s*['\"]?(avit_jax[\w.]*)", source))
  assert commands and commands <= PUBLIC_COMMANDS, commands - PUBLIC_COMMANDS
  imported = _avit_jax_imports(source)
  assert imported <= PUBLIC_MODULES, f'{name} imports non-public {imported - PUBLIC_MODULES}'


def _avit_jax_imports(source: str) -> set[str]:
  """Every avit_jax module or name a notebook's code imports, as a dotted name: `import
  avit_jax.a.b` -> avit_jax.a.b, `from avit_jax.a import b` -> avit_jax.a.b (a submodule or a
  name of avit_jax.a), `from avit_jax import a` -> avit_jax.a; bare `import avit_jax` is
  allowed. Shell (`!`) and magic (`%`) lines are read as `pass`."""
  python = '\n'.join(line[:len(line) - len(line.lstrip())] + 'pass'
                     if line.lstrip().startswith(('!', '%')) else line
                     for line in source.splitlines())
  names = set()
  for node in ast.walk(ast.parse(python)):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names if a.name.startswith('avit_jax.')}
    elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] == 'avit_jax':
      names |= {f'{node.module}.{a.name}' for a in node.names}
  # A name taken from a public module is public too (`from avit_jax.models import AViT`).
  return {n for n in names if n.rsplit('.', 1)[0] not in PUBLIC_MODULES - {'avit_jax'}}


def test_import_check_catches_every_form():
  """The check above on the ways one can import a module that is not public."""
  for line in ('from avit_jax import train', 'import avit_jax.training.train',
               'from avit_jax.training import train', 'import avit_jax.training.train as t',
               'from avit_jax.training.train import train_and_evaluate',
               'if True:\n  from avit_jax import data'):
    assert _avit_jax_imports(line + '\n!ls\n') - PUBLIC_MODULES, line
  for line in ('from avit_jax import models, inference', 'import avit_jax',
               'from avit_jax.analysis import plots', 'from avit_jax.models import AViT',
               'import numpy as np'):
    assert not _avit_jax_imports(line) - PUBLIC_MODULES, line


def _kernel(tmp_path, monkeypatch):
  """A kernel spec that starts this interpreter (the venv's), on one CPU device."""
  spec = tmp_path / 'jupyter' / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'avit_jax test', 'language': 'python',
      # conftest's 8 fake devices are for sharding tests; a user's runtime has its own.
      'env': {'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2'},
  }))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))


def _execute(name, params, tmp_path, monkeypatch):
  """Runs a notebook with `params` appended to its parameters cell; returns (nb, error)."""
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError

  _kernel(tmp_path, monkeypatch)
  nb = _read(name)
  cell = _parameters_cell(nb)
  cell.source += '\n# injected by tests/test_notebooks.py\n' + ''.join(
      f'{k} = {v!r}\n' for k, v in params.items())
  client = NotebookClient(nb, kernel_name=KERNEL, timeout=900,
                          resources={'metadata': {'path': ROOT}})
  try:
    client.execute()
  except CellExecutionError as e:
    return nb, e
  return nb, None


def _text(nb):
  out = []
  for c in nb.cells:
    for o in c.get('outputs', []):
      out.append(o.get('text', '') or json.dumps(o.get('data', {}).get('text/plain', '')))
  return ''.join(out)


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, monkeypatch, fashion_mnist_dir):
  work = tmp_path / 'work'
  nb, error = _execute('quickstart.ipynb', dict(SMOKE=True, INSTALL=False, WORKDIR=str(work),
                                                DATA_DIR=fashion_mnist_dir), tmp_path, monkeypatch)
  assert error is None, f'quickstart.ipynb failed:\n{error}'
  with open(work / 'eval.json') as f:
    result = json.load(f)
  assert 0.0 <= result['top1'] <= 1.0 and result['top1'] <= result['top5']
  assert 1.0 <= result['mean_token_depth'] <= 6.0  # embedded default: 6 layers
  depths = np.load(work / 'visualize' / 'depths.npz')
  assert depths['token_depth'].shape == (32, 17)  # SMOKE: 32 images, 1 + 4 * 4 tokens (patch 7)
  assert set(np.unique(depths['token_depth'])) <= set(range(1, 7))
  images = [o for c in nb.cells for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
  assert len(images) == 1 + 2 + 5 + 1  # grid, two depth maps, five plots, the Python-API map


@pytest.mark.slow
def test_tpu_notebook_stops_where_imagenet_is_needed(tmp_path, monkeypatch):
  import torch
  from avit_jax import checkpoints, config_lib, convert, models
  from configs import tiny

  # A random DeiT-T in the published file's format stands in for the download.
  deit = tiny.get_config().model
  deit.halting = False
  state = convert.to_torch_state_dict(models.create(deit, seed=3))
  pth = tmp_path / 'deit_tiny_patch16_224-a1311bcf.pth'
  torch.save({'model': {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, pth)

  init = tmp_path / 'init'
  nb, error = _execute('imagenet_finetune_tpu.ipynb', dict(
      SMOKE=True, INSTALL=False, DEIT_CHECKPOINT=str(pth), INIT_DIR=str(init),
      TFDS_DATA_DIR=str(tmp_path / 'no_imagenet'), WORKDIR=str(tmp_path / 'work')),
      tmp_path, monkeypatch)
  assert error is not None and error.ename == 'NeedsImageNet', f'unexpected end:\n{error}'
  assert 'ImageNet-1k is needed from here on' in error.evalue
  assert 'tfds build imagenet2012' in error.evalue
  # Every cell before the ImageNet check ran; none after it.
  code = [c for c in nb.cells if c.cell_type == 'code']
  stop = next(i for i, c in enumerate(code) if 'needs-imagenet' in c.metadata.get('tags', []))
  assert all(c.execution_count for c in code[:stop + 1])
  assert not any(c.execution_count for c in code[stop + 1:])
  # The conversion wrote the DeiT-T weights as an A-ViT-T checkpoint.
  params, metadata = checkpoints.load_params(str(init))
  assert metadata['model']['variant'] == 'avit_tiny_patch16_224'
  np.testing.assert_array_equal(config_lib.flatten(params)['blocks.3.mlp.fc1.kernel'],
                                state['blocks.3.mlp.fc1.weight'].T)
  assert 'converted: 5.7' in _text(nb)  # DeiT-T: 5.72 M parameters
