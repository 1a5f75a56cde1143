"""Bad input, each with its exact error: config typos, types and impossible values (before any
compilation), unusable or busy workdirs, checkpoints of another architecture, data faults not
covered by tests/test_input_pipeline.py, and model inputs that are NaN or of the wrong kind.
"""

import io
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from avit_jax import checkpoints, command_line, inference, models
from avit_jax.data import sources, pipeline
from avit_jax.training import train, validation
from avit_jax.training.workdir import Workdir, WorkdirError
from configs import fashion_mnist
from tests.helpers import data_config, gray_pixels, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, 'configs', 'fashion_mnist.py')


def _cli(tmp_path, *flags):
  """`python -m avit_jax.main` with the default config: (exit status, output)."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run(
      [sys.executable, '-m', 'avit_jax.main', '--config', CONFIG_FILE, '--workdir',
       str(tmp_path / 'wd'), *flags], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  return result.returncode, result.stdout + result.stderr


# -- config -------------------------------------------------------------------------------


def test_typo_names_the_nearest_fields():
  with pytest.raises(ValueError) as e:
    command_line.load_config(CONFIG_FILE, ['--config.optimizer.lrr=1e-3'])
  assert str(e.value) == (
      "unknown config field 'optimizer.lrr'; did you mean optimizer.lr, optimizer.min_lr, "
      f'optimizer.b2? (valid fields are listed in {CONFIG_FILE}; see avit_jax/config_lib.py)')
  with pytest.raises(ValueError, match=r"'modle.dim'; did you mean model.dim, mode, model.heads"):
    command_line.load_config(CONFIG_FILE, ['--config.modle.dim=3'])
  assert command_line.load_config(CONFIG_FILE, ['--config.model.dim', '3']).model.dim == 3


@pytest.mark.parametrize('flag, message', [
    ('--config.batch_size=32.5',
     "flag --config.batch_size=32.5: invalid literal for int() with base 10: '32.5'"),
    ('--config.model.halting=maybe',
     "flag --config.model.halting=maybe: ('Non-boolean argument to boolean flag', 'maybe')"),
])
def test_cli_wrong_types_fail_at_parsing(tmp_path, flag, message):
  status, output = _cli(tmp_path, flag)
  assert status == 1 and message in output, output
  assert not (tmp_path / 'wd').exists()


def test_cli_impossible_value_is_one_line_without_traceback(tmp_path):
  status, output = _cli(tmp_path, '--config.model.gate_scale=0')
  assert status == 1
  assert output.strip().splitlines()[-1] == (
      'error: config.model.gate_scale=0.0 is invalid: expected > 0')
  assert 'Traceback' not in output and not (tmp_path / 'wd').exists()


@pytest.mark.parametrize('overrides, message', [
    ({'batch_size': 12}, 'config.batch_size=12 is invalid: must be divisible by the number of '
                         'devices (8); use a multiple of 8'),
    ({'eval_batch_size': 100}, 'config.eval_batch_size=100 is invalid: must be divisible by the '
                               'number of devices (8); use a multiple of 8'),
    ({'model.patch': 5}, 'config.model.patch=5 is invalid: it must divide model.image_size=28'),
    ({'model.gate_scale': 0.0}, 'config.model.gate_scale=0.0 is invalid: expected > 0'),
    ({'model.gate_scale': -10.0}, 'config.model.gate_scale=-10.0 is invalid: expected > 0'),
    ({'model.eps': 0.0}, 'config.model.eps=0.0 is invalid: expected a value in (0, 1)'),
    ({'model.eps': 1.0}, 'config.model.eps=1.0 is invalid: expected a value in (0, 1)'),
    ({'model.eps': -0.5}, 'config.model.eps=-0.5 is invalid: expected a value in (0, 1)'),
    # The data against the config: what used to fail only at the first eval or batch.
    ({'data.eval_split': 'validation'}, "config.data.eval_split='validation' is invalid: "
                                        "fashion_mnist has splits ['test', 'train']"),
    ({'data.train_split': 'training'}, "config.data.train_split='training' is invalid: "
                                       "fashion_mnist has splits ['test', 'train']"),
    ({'data.source': 'folder', 'data.data_dir': '/nonexistent/avit_data'},
     "config.data.data_dir='/nonexistent/avit_data' is invalid: source \"folder\" needs an "
     'existing directory ROOT holding ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG'),
    ({'data.crop_pct': 1.5}, 'config.data.crop_pct=1.5 is invalid: eval resizes the shorter '
                             'side to floor(model.image_size / crop_pct) and crops '
                             'model.image_size=28 from it; expected a value in (0, 1]'),
    ({'model.in_chans': 1}, 'config.model.in_chans=1 is invalid: the input pipeline makes RGB '
                            'images; expected 3'),
    ({'model.num_classes': 5}, 'config.model.num_classes=5 is invalid: fashion_mnist has 10 '
                               'classes (labels 0..9); expected at least 10'),
])
def test_impossible_values_fail_before_any_compilation(tmp_path, overrides, message):
  assert jax.device_count() == 8
  compiles = []
  listener = lambda event, *args, **kwargs: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(ValueError) as e:
      train.train_and_evaluate(tiny_config(**overrides), str(tmp_path / 'wd'))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert str(e.value) == message
  assert not [c for c in compiles if 'compile' in c], compiles
  assert not (tmp_path / 'wd').exists()  # nothing touched


def test_wrong_types_in_a_config_built_from_a_dict():
  # A config file may build its ConfigDict from a plain dict, which ConfigDict does not
  # type-check; validate compares every field with base_config()'s type.
  for field, value, message in [
      ('batch_size', 32.5, 'config.batch_size=32.5 is invalid: expected an integer (int), got '
                           'float'),
      ('seed', True, 'config.seed=True is invalid: expected an integer (int), got bool'),
      ('model.eps', '0.01', "config.model.eps='0.01' is invalid: expected a number (float), got "
                            'str'),
      ('model.halting', 1, 'config.model.halting=1 is invalid: expected true or false (bool), '
                           'got int'),
      ('data.mean', 0.5, 'config.data.mean=0.5 is invalid: expected a list of values (tuple), '
                         'got float'),
  ]:
    raw = fashion_mnist.get_config().to_dict()
    *parents, leaf = field.split('.')
    node = raw
    for p in parents:
      node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError) as e:
      validation.validate_config(ml_collections.ConfigDict(raw), device_count=1)
    assert str(e.value) == message
  config = fashion_mnist.get_config()
  config.model.gate_scale = 10  # an int where a float is expected is fine
  validation.validate_config(config, device_count=1)


# Runs `python -m avit_jax.main` on a machine without network: name lookups fail and no
# connection opens, as on a host without internet access.
OFFLINE_MAIN = '''
import socket, sys
def no_dns(*args, **kwargs):
  raise socket.gaierror(-2, 'Name or service not known')
def refuse(*args, **kwargs):
  raise ConnectionRefusedError(111, 'Connection refused')
socket.getaddrinfo = no_dns
socket.socket.connect = refuse
from avit_jax import main
sys.argv = ['avit_jax.main'] + sys.argv[1:]
main.run()
'''


def test_default_command_without_data_or_network_fails_within_seconds(tmp_path):
  """The default command where neither the Debian package's files nor a tfds copy exist and
  nothing can be downloaded: the instructions come at once (tfds alone retried for minutes)."""
  no_data = tmp_path / 'no_fashion_mnist'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             TFDS_DATA_DIR=str(tmp_path / 'tensorflow_datasets'))
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, '-c', OFFLINE_MAIN, '--config', CONFIG_FILE, '--workdir',
       str(tmp_path / 'wd'), f'--config.data.data_dir={no_data}'], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=120)
  elapsed = time.monotonic() - start
  assert result.returncode == 1 and elapsed < 30, (elapsed, result.stderr[-3000:])
  idx = [str(no_data / f'train-{k}-idx{n}-ubyte{s}') for s in ('.gz', '')
         for k, n in (('images', 3), ('labels', 1))]
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: Fashion-MNIST not found. Tried the IDX files {idx} '
      f"(config.data.data_dir='{no_data}') and tensorflow-datasets \"fashion_mnist\" "
      '(ConnectionError: cannot reach fashion-mnist.s3-website.eu-central-1.amazonaws.com:80 to '
      'download ([Errno -2] Name or service not known); no network?). Provide the data with '
      '`apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist), or '
      'copy '
      'train-/t10k-{images-idx3,labels-idx1}-ubyte.gz into a directory and set '
      '--config.data.data_dir to it.')
  assert 'Traceback' not in result.stderr


def test_folder_split_missing_names_the_folders(tmp_path):
  os.makedirs(tmp_path / 'train' / 'a')
  os.makedirs(tmp_path / 'test' / 'a')
  config = tiny_config(**{'data.source': 'folder', 'data.data_dir': str(tmp_path),
                          'data.eval_split': 'validation'})
  with pytest.raises(ValueError) as e:
    validation.validate_config(config)
  assert str(e.value) == (f"config.data.eval_split='validation' is invalid: {tmp_path} has no "
                          "folder 'validation' (or val); its folders are ['test', 'train']")
  config.mode = 'eval'  # reads the eval split only
  config.data.eval_split = 'test'
  validation.validate_config(config)


def test_missing_fashion_mnist_is_a_config_error(tmp_path, monkeypatch):
  # Refused by validate_config (main reports its ValueErrors in one line) and still a
  # FileNotFoundError for those that catch missing files.
  def refuse(address, timeout=None):
    raise ConnectionRefusedError(111, 'Connection refused')
  real_builder = sources.tfds.builder
  monkeypatch.setattr(sources.tfds, 'builder',
                      lambda name, **kwargs: real_builder(name, data_dir=str(tmp_path / 'tfds')))
  monkeypatch.setattr(sources.socket, 'create_connection', refuse)
  config = tiny_config(**{'data.data_dir': str(tmp_path / 'none')})
  with pytest.raises(sources.DataNotFoundError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert isinstance(e.value, ValueError) and isinstance(e.value, FileNotFoundError)
  assert str(e.value).startswith('Fashion-MNIST not found. Tried the IDX files ')
  assert not (tmp_path / 'wd').exists()


def test_a_failure_mid_run_saves_the_last_step(tmp_path, monkeypatch):
  # The eval at step 6 fails: step 6 was trained and is saved before the error propagates.
  # One device: nothing here depends on sharding, and its programs compile fastest.
  config = tiny_config(**{'eval_every_steps': 6})
  real_evaluate = train.evaluate_split

  def failing_evaluate(*args, **kwargs):
    raise RuntimeError('eval failed')
  monkeypatch.setattr(train, 'evaluate_split', failing_evaluate)
  workdir = tmp_path / 'wd'
  with pytest.raises(RuntimeError, match='^eval failed$'):
    train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '6']
  check = checkpoints.check_step(str(workdir / 'checkpoints' / '6'))
  assert check.ok, check.problems
  # The rerun resumes at step 6 and finishes.
  monkeypatch.setattr(train, 'evaluate_split', real_evaluate)
  resumed = []
  real_iterator = train.pipeline.train_iterator
  monkeypatch.setattr(train.pipeline, 'train_iterator',
                      lambda c, start_step: resumed.append(start_step) or real_iterator(
                          c, start_step=start_step))
  assert train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])['step'] == 8
  assert resumed == [6]


# -- workdir ------------------------------------------------------------------------------


def test_unwritable_workdir(tmp_path):
  # Root ignores permission bits, so use places no one can write: under a regular file,
  # and sysfs.
  (tmp_path / 'file.txt').write_text('not a directory')
  path = str(tmp_path / 'file.txt' / 'run')
  with pytest.raises(WorkdirError) as e:
    Workdir(path, tiny_config())
  assert str(e.value) == (f'workdir {path} is not writable (Not a directory); choose a '
                          'directory you can write to with --workdir')
  with pytest.raises(WorkdirError, match=r'^workdir /sys/avit_jax_test is not writable \('):
    Workdir('/sys/avit_jax_test', tiny_config())


def test_workdir_of_a_different_config_is_refused(tmp_path):
  path = str(tmp_path)
  Workdir(path, tiny_config()).close()
  # No checkpoint yet: nothing to mix with, so a changed config may take the workdir over.
  Workdir(path, tiny_config(**{'optimizer.lr': 1e-3})).close()
  os.makedirs(tmp_path / 'checkpoints' / '4')
  with pytest.raises(WorkdirError) as e:
    Workdir(path, tiny_config(**{'optimizer.lr': 5e-3, 'model.depth': 2}))
  assert str(e.value) == (
      f'workdir {path} holds a run with a different config:\n'
      '  model.depth: workdir has 3, this run has 2\n'
      '  optimizer.lr: workdir has 0.001, this run has 0.005\n'
      'use a new --workdir, or the same config to resume that run')
  # Run-control fields may change on resume (e.g. train longer, skip non-finite steps).
  Workdir(path, tiny_config(**{'optimizer.lr': 1e-3, 'num_train_steps': 100,
                                'skip_nonfinite_steps': True})).close()


def test_two_runs_in_one_workdir_are_refused(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\n'
       'from avit_jax.training.workdir import Workdir\nfrom configs import fashion_mnist\n'
       'w = Workdir(sys.argv[1], fashion_mnist.get_config())\nprint("locked", flush=True)\n'
       'time.sleep(600)', str(tmp_path)],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(WorkdirError) as e:
      Workdir(str(tmp_path), fashion_mnist.get_config())
    assert str(e.value) == (f'another run (pid {holder.pid}) is using workdir {tmp_path}; wait '
                            'for it to finish or use another --workdir')
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  Workdir(str(tmp_path), fashion_mnist.get_config()).close()  # a killed run frees it


# -- checkpoints of another architecture ----------------------------------------------------

@pytest.fixture(scope='module')
def other_architecture(tmp_path_factory):
  """A parameter checkpoint of depth 3 and 7 classes (the runs below: depth 2, 10 classes)."""
  other = tiny_config(**{'model.depth': 3, 'model.num_classes': 7})
  model = models.create(other.model, seed=0)
  return checkpoints.save_params(
      str(tmp_path_factory.mktemp('other') / 'ckpt'),
      nnx.to_pure_dict(nnx.state(model, nnx.Param)),
      {'model': checkpoints.metadata_json(other.model)})


BLOCK2_SHAPES = {'attn.proj.bias': (32,), 'attn.proj.kernel': (32, 32), 'attn.qkv.bias': (96,),
                 'attn.qkv.kernel': (32, 96), 'mlp.fc1.bias': (128,), 'mlp.fc1.kernel': (32, 128),
                 'mlp.fc2.bias': (32,), 'mlp.fc2.kernel': (128, 32), 'norm1.bias': (32,),
                 'norm1.scale': (32,), 'norm2.bias': (32,), 'norm2.scale': (32,)}
BLOCK2_NOT_IN_MODEL = '  not in the model: ' + ', '.join(
    f'blocks.2.{n} {s}' for n, s in list(BLOCK2_SHAPES.items())[:5]) + ', and 7 more'



def test_eval_of_another_architecture_lists_mismatches(tmp_path, other_architecture):
  config = tiny_config(**{'model.depth': 2, 'mode': 'eval', 'eval_checkpoint': other_architecture})
  with pytest.raises(checkpoints.CheckpointError) as e:
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert str(e.value) == (
      f'checkpoint {other_architecture} does not fit the model:\n'
      '  shape mismatches: head.bias: model (10,) vs checkpoint (7,); head.kernel: model '
      '(32, 10) vs checkpoint (32, 7)\n' + BLOCK2_NOT_IN_MODEL + '\n'
      '  hint: the checkpoint has depth 3, width 32 and num_classes 7; choose the matching '
      'config or override, e.g. --config.model.depth=3 --config.model.dim=32 '
      '--config.model.num_classes=7')


def test_init_from_another_architecture_lists_mismatches(tmp_path, other_architecture):
  # init_from applies the fine-tuning rules to the native parameters: a head of another size
  # is re-initialised, a missing or extra block is an error naming the checkpoint's names.
  config = tiny_config(**{'model.depth': 2, 'init_from': other_architecture})
  with pytest.raises(checkpoints.CheckpointError) as e:
    train.prepare_training(config, jax.devices()[:1])
  assert str(e.value) == (
      f'config.init_from={other_architecture!r} does not fit the model:\n' + BLOCK2_NOT_IN_MODEL
      + '\n  hint: the checkpoint has depth 3 and width 32; choose the matching config or '
      'override, e.g. --config.model.depth=3 --config.model.dim=32')


# -- data (what tests/test_input_pipeline.py does not already cover) ------------------------


def _png_bytes(pil: Image.Image) -> bytes:
  b = io.BytesIO()
  pil.save(b, 'PNG')
  return b.getvalue()


def test_other_pixel_formats_decode_to_the_same_gray_pixels(tmp_path, fashion_mnist_dir):
  """RGBA, palette, 16-bit and animated images are converted to the stored RGB pixels."""
  table = sources.fashion_mnist(fashion_mnist_dir, 'test')
  images = table.images[:4]
  encoders = {
      'rgba.png': lambda a: _png_bytes(Image.fromarray(np.dstack([a, a, a, np.full_like(a, 9)]))),
      'palette.png': lambda a: _png_bytes(Image.fromarray(a).convert('P')),
      # 16-bit: value v stored as 257 v; decoding to uint8 divides by 257 exactly.
      'gray16.png': lambda a: _png_bytes(Image.fromarray(a.astype(np.uint16) * 257)),
  }
  for split in ('train', 'val'):
    os.makedirs(tmp_path / split / 'c')
  for k, (name, encode) in enumerate(encoders.items()):
    (tmp_path / 'val' / 'c' / f'{k}{name}').write_bytes(encode(images[k]))
    (tmp_path / 'train' / 'c' / f'{k}{name}').write_bytes(encode(images[k]))
  # An animated GIF: the first frame is used.
  frames = [Image.fromarray(images[3]).convert('P'), Image.fromarray(255 - images[3]).convert('P')]
  frames[0].save(tmp_path / 'val' / 'c' / '3anim.gif', save_all=True, append_images=frames[1:])
  config = data_config(tmp_path, source='folder')
  config.model.num_classes = 1
  batch = next(pipeline.eval_iterator(config))
  assert batch['mask'].tolist() == [1] * 4 + [0] * 4
  pixels = gray_pixels(batch['images'][:4])
  np.testing.assert_array_equal(pixels[:3], images[:3])
  np.testing.assert_array_equal(pixels[3], np.asarray(frames[0].convert('L')))


def test_split_without_class_folders_and_unknown_eval_class(tmp_path):
  os.makedirs(tmp_path / 'train' / 'a')
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / 'train' / 'a' / '0.png')
  os.makedirs(tmp_path / 'val')
  sources.folder.cache_clear()
  with pytest.raises(ValueError) as e:
    pipeline.num_examples(data_config(tmp_path, source='folder'), 'validation')
  assert str(e.value) == f'Split directory {tmp_path}/val has no class folders with images'
  os.makedirs(tmp_path / 'val' / 'b')  # a class the train split does not have
  sources.folder.cache_clear()
  with pytest.raises(ValueError) as e:
    pipeline.num_examples(data_config(tmp_path, source='folder'), 'validation')
  assert str(e.value) == (f'Class folder {tmp_path}/val/b has no counterpart in the train split '
                          '(1 classes); class indices would disagree.')


def test_fashion_mnist_truncated_file_wrong_split_and_labels(tmp_path, fashion_mnist_dir):
  import gzip
  for kind, n in (('images', 3), ('labels', 1)):
    with gzip.open(os.path.join(fashion_mnist_dir, f't10k-{kind}-idx{n}-ubyte.gz')) as f:
      data = f.read()
    if kind == 'images':
      data = data[:16 + 28 * 28 * 5 - 1]  # header says 10,000 images; 5 minus a byte follow
    with gzip.open(tmp_path / f't10k-{kind}-idx{n}-ubyte.gz', 'wb') as f:
      f.write(data)
  with pytest.raises(ValueError) as e:
    sources.fashion_mnist(str(tmp_path), 'test')
  assert str(e.value) == (f'{tmp_path}/t10k-images-idx3-ubyte.gz is truncated: header says '
                          '[10000, 28, 28], found 3919 values')
  with pytest.raises(ValueError) as e:
    sources.fashion_mnist(fashion_mnist_dir, 'validation')
  assert str(e.value) == ("Fashion-MNIST has splits ['test', 'train'], got 'validation' "
                          '(config.data.train_split / eval_split)')
  config = data_config()
  config.model.num_classes = 5  # labels go up to 9: never silently wrong
  with pytest.raises(ValueError) as e:
    next(pipeline.eval_iterator(config))
  assert str(e.value) == 'fashion_mnist/test has labels up to 9 but config.model.num_classes=5'


# -- model inputs -------------------------------------------------------------------------

# The ways of running a model that must all refuse bad images (named here, not taken from
# inference, so that a new mode is added here on purpose).
PREDICT_MODES = ('dense', 'masked', 'compact')


@pytest.fixture(scope='module')
def model():
  config = tiny_config().model
  return models.create(config, seed=0)


@pytest.mark.parametrize('mode', PREDICT_MODES + ('auto',))
def test_predict_rejects_wrong_shape_and_dtype(model, mode):
  predict = inference.make_predict_fn(model, mode)
  for bad in (jnp.zeros((28, 28, 3)), jnp.zeros((2, 28, 28, 1)), jnp.zeros((2, 32, 32, 3))):
    with pytest.raises(ValueError, match=r'expected images of shape \[B, 28, 28, 3\]'):
      predict(bad)
  with pytest.raises(ValueError, match='expected floating-point images'):
    predict(jnp.zeros((2, 28, 28, 3), jnp.uint8))


def test_nan_and_inf_images_give_nan_logits_for_that_image_only(model):
  """Documented result (no host check in the jitted model): an image with a NaN or inf pixel
  has NaN logits and every token halts at layer 1 (depth 1, ponder 1; the dense mode reports
  L); the other images of the batch are unaffected."""
  rng = np.random.default_rng(0)
  clean = rng.normal(size=(4, 28, 28, 3)).astype(np.float32)
  bad = clean.copy()
  bad[1] = np.nan
  bad[2, 3, 4, 0] = np.inf
  for mode in PREDICT_MODES:
    predict = inference.make_predict_fn(model, mode)
    ref, out = predict(jnp.asarray(clean)), predict(jnp.asarray(bad))
    logits, depth = np.asarray(out.logits), np.asarray(out.token_depth)
    assert np.isnan(logits).any(axis=1).tolist() == [False, True, True, False], mode
    full = model.depth if mode == 'dense' else 1
    np.testing.assert_array_equal(depth[1:3], full)
    np.testing.assert_array_equal(np.asarray(out.ponder)[1:3], full)
    ok = [0, 3]
    np.testing.assert_array_equal(depth[ok], np.asarray(ref.token_depth)[ok])
    # Compact packs the batch's running tokens into other bucket shapes: fp32 rounding.
    np.testing.assert_allclose(logits[ok], np.asarray(ref.logits)[ok], rtol=0,
                               atol=1e-5 if mode == 'compact' else 0,
                               err_msg=mode)

