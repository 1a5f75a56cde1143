"""The commands' own errors: one line each, printed once, before anything is made."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))


def test_a_missing_config_file_is_one_line(tmp_path):
  for command in (('avit_jax.main', '--workdir', str(tmp_path / 'run')),
                  ('avit_jax.convert', '--src', 'x.pth', '--out', str(tmp_path / 'out'))):
    done = _command(*command, '--config', 'configs/tiyn.py')
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        'error: config file configs/tiyn.py not found (expected a file such as configs/tiny.py, '
        'relative to the current directory or absolute)']
  assert not (tmp_path / 'run').exists()


def test_main_prints_an_error_once(tmp_path, fashion_mnist_dir):
  missing = str(tmp_path / 'nowhere')
  done = _command('avit_jax.main', '--config', 'configs/fashion_mnist.py', '--workdir',
                  str(tmp_path / 'run'), '--mode', 'eval', f'--config.eval_checkpoint={missing}',
                  f'--config.data.data_dir={fashion_mnist_dir}', '--config.eval_batch_size=64')
  assert done.returncode == 1
  errors = [l for l in done.stderr.splitlines() if missing in l]
  assert errors == [f'error: checkpoint {missing} does not exist (expected a directory written '
                    'by avit_jax.convert, a trainer step WORKDIR/checkpoints/<step>, or a '
                    'training workdir)']
  assert 'Traceback' not in done.stderr


def test_overrides_apply_to_a_config_file_and_to_a_saved_config():
  import pytest
  from avit_jax import command_line
  config = command_line.load_config('configs/fashion_mnist.py', ['--config.model.depth', '3'])
  assert config.model.depth == 3
  saved = command_line.load_config(config, ['--config.data.data_dir=/elsewhere',
                                            '--config.model.gate_center=4'])
  assert (saved.data.data_dir, saved.model.gate_center, saved.model.depth) == (
      '/elsewhere', 4.0, 3)
  assert config.data.data_dir != '/elsewhere'  # the source is left as it was
  with pytest.raises(ValueError, match=r"^unknown config field 'data.data_dirr'; did you mean "
                     r'data.data_dir.*the saved config'):
    command_line.load_config(config, ['--config.data.data_dirr=/x'])
