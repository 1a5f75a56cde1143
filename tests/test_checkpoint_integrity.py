"""Checkpoint integrity: checksums recorded at save time and verified on every load; damaged
files in a real trained workdir (bytes flipped in an array chunk, truncated, deleted or
emptied files, for the newest step and for the only step) make resume fall back to the newest
intact step or stop with a clear error, make eval refuse, and never give wrong numbers;
nothing is deleted.

One tiny run (module fixture, with EMA so every item kind exists); every case works on a
copy of its workdir. Arrays split over the 8 devices (mesh.fsdp = 8) and over two processes
get one checksum per shard, and a flipped byte names its shard; gs:// paths go through epath.
"""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils.epath import gpath, testing as epath_testing
from flax import nnx

from avit_jax import checkpoints
from avit_jax.training import sharding, train
from tests.helpers import (REPO, TINY_FLAGS, abstract_tree, flip_in_shard, fsdp_mesh, split_trees,
                           tiny_config)

# The processes' tiny run (tests/helpers.py), 4 steps with checkpoints 2 and 4 and an EMA.
OVERRIDES = {**TINY_FLAGS, 'num_train_steps': 4, 'eval_every_steps': 4, 'log_every_steps': 2,
             'optimizer.ema_decay': 0.9}
ITEMS = ('params', 'opt_state', 'ema_params')


def _config(**extra):
  return tiny_config(**{**OVERRIDES, **extra})


def _flat(tree) -> dict:
  """{path: numpy array} of any pytree (nnx.State, optax state or nested dicts)."""
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  return {checkpoints.integrity.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_bitwise(a: dict, b: dict, note: str = '') -> None:
  assert a.keys() == b.keys(), note
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=f'{name} {note}')


@pytest.fixture(scope='module')
def run(tmp_path_factory, fashion_mnist_dir):
  """The trained workdir, its eval metrics, and the restore template of its state."""
  del fashion_mnist_dir  # the config's default data_dir; the fixture checks it exists
  workdir = str(tmp_path_factory.mktemp('trained'))
  config = _config()
  metrics = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  program, state = train.prepare_training(config, jax.devices()[:1])
  return {'workdir': workdir, 'config': config, 'metrics': metrics, 'state': state,
          'shardings': program.state_shardings}


def _copy(run, tmp_path, *, only_newest: bool = False) -> str:
  """A copy of the trained workdir (without step 2 when `only_newest`)."""
  workdir = str(tmp_path / 'workdir')
  ignore = (lambda d, names: ['2'] if os.path.basename(d) == 'checkpoints' else []
            ) if only_newest else None
  shutil.copytree(run['workdir'], workdir, ignore=ignore)
  return workdir


def _resume(run, workdir):
  """train.restore_or_init on `workdir`: the state it resumes from."""
  manager = checkpoints.TrainCheckpoints(workdir, keep=10, async_save=False)
  try:
    return train.restore_or_init(manager, run['state'], run['shardings'])
  finally:
    manager.close()


@pytest.fixture(scope='module')
def intact(run):
  """What the undamaged steps restore to: {step: (resumed state arrays, load_params)}."""
  out = {}
  for step in (2, 4):
    only = os.path.join(os.path.dirname(run['workdir']), f'only_{step}')
    shutil.copytree(run['workdir'], only,
                    ignore=lambda d, names, s=step: [n for n in names if n.isdigit() and
                                                     n != str(s)]
                    if os.path.basename(d) == 'checkpoints' else [])
    state = _resume(run, only)
    assert int(state.step) == step
    out[step] = ({k: _flat(getattr(state, k)) for k in ITEMS},
                 _flat(checkpoints.load_params(os.path.join(only, 'checkpoints', str(step)))[0]))
  return out


# -- what is recorded, bit-identical loads, checkpoints from before checksums ----------------


def test_checksums_are_recorded_for_every_saved_array(run):
  step = os.path.join(run['workdir'], 'checkpoints', '4')
  with open(os.path.join(step, 'metadata', 'metadata')) as f:
    field = json.load(f)['checksums']
  assert field['algorithm'] == 'crc32' and sorted(field['arrays']) == sorted(ITEMS)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    raw = checkpointer.restore(step, ocp.args.Composite(
        **{item: ocp.args.StandardRestore() for item in ITEMS}))
  for item in ITEMS:
    arrays = _flat(raw[item])
    assert sorted(field['arrays'][item]) == sorted(arrays), item
    for name, value in arrays.items():  # crc32 of the C-order bytes, by hand
      record = field['arrays'][item][name]
      assert record == {'crc32': f'{zlib.crc32(np.ascontiguousarray(value).tobytes()):08x}',
                        'dtype': str(value.dtype), 'shape': list(value.shape)}, (item, name)
  # Depth 2: 12 arrays per block, 8 outside; AdamW's mu and nu of each, and two step counts.
  assert len(field['arrays']['params']) == len(field['arrays']['ema_params']) == 32
  assert len(field['arrays']['opt_state']) == 2 * 32 + 2


def test_verified_loads_are_bit_identical_to_unverified_ones(run, tmp_path):
  step = os.path.join(run['workdir'], 'checkpoints', '4')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    raw = checkpointer.restore(step, ocp.args.Composite(params=ocp.args.StandardRestore()))
  params, metadata = checkpoints.load_params(step)
  _assert_bitwise(_flat(params), _flat(raw['params']))
  assert 'checksums' not in metadata and metadata['model']['depth'] == 2
  # The trainer's verified restore against orbax's own, on the same abstract state.
  resumed = _resume(run, _copy(run, tmp_path))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          run['state'], run['shardings'])
  manager = checkpoints.TrainCheckpoints(run['workdir'], keep=10, async_save=False)
  try:
    plain = manager.manager.restore(4, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(nnx.to_pure_dict(abstract.params)),
        opt_state=ocp.args.StandardRestore(abstract.opt_state),
        ema_params=ocp.args.StandardRestore(nnx.to_pure_dict(abstract.ema_params))))
  finally:
    manager.close()
  for item in ITEMS:
    _assert_bitwise(_flat(getattr(resumed, item)), _flat(plain[item]), item)


def _drop_checksums(step_dir: str) -> None:
  path = os.path.join(step_dir, 'metadata', 'metadata')
  with open(path) as f:
    metadata = json.load(f)
  del metadata['checksums']
  with open(path, 'w') as f:
    json.dump(metadata, f)


def test_checkpoints_without_checksums_load_with_a_warning(run, intact, tmp_path, caplog):
  workdir = _copy(run, tmp_path)
  step4 = os.path.join(workdir, 'checkpoints', '4')
  _drop_checksums(step4)  # as written before this change
  with caplog.at_level(logging.WARNING):
    params, _ = checkpoints.load_params(step4)
    state = _resume(run, workdir)
  assert caplog.text.count(f'{step4} has no array checksums (written before avit_jax '
                           'recorded them): its arrays are used unverified') == 2
  assert int(state.step) == 4
  _assert_bitwise(_flat(params), intact[4][1])
  _assert_bitwise(_flat(state.params), intact[4][0]['params'])
  # A parameter checkpoint as the old save_params wrote it: params and metadata only.
  old = str(tmp_path / 'old_params')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(old, ocp.args.Composite(
        params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave({'model': {}})))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    loaded, metadata = checkpoints.load_params(old)
  assert f'{old} has no array checksums' in caplog.text and metadata == {'model': {}}
  _assert_bitwise(_flat(loaded), intact[4][1])
  check = checkpoints.check_step(old)
  assert check.ok and check.arrays_verified == 0


def test_save_params_records_and_verifies_checksums(tmp_path):
  params = {'blocks': {'0': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}},
            'count': np.asarray(7, np.int32)}
  out = checkpoints.save_params(str(tmp_path / 'ckpt'), params, {'source': 'test'})
  loaded, metadata = checkpoints.load_params(out)
  assert metadata == {'source': 'test'}
  _assert_bitwise(_flat(loaded), _flat(params))
  check = checkpoints.check_step(out)
  assert check.ok and check.arrays_verified == 2
  with open(os.path.join(out, 'metadata', 'metadata')) as f:
    recorded = json.load(f)['checksums']['arrays']['params']
  assert recorded == {
      'blocks/0/w': {'crc32': f'{zlib.crc32(np.arange(6, dtype=np.float32).tobytes()):08x}',
                     'dtype': 'float32', 'shape': [2, 3]},
      'count': {'crc32': f'{zlib.crc32(np.int32(7).tobytes()):08x}', 'dtype': 'int32',
                'shape': []}}


# -- fault injection ----------------------------------------------------------------------


def _damage(path: str, how: str) -> None:
  size = os.path.getsize(path)
  if how == 'flip':  # 64 bytes in the middle, every bit inverted
    with open(path, 'r+b') as f:
      f.seek(size // 2)
      data = f.read(64)
      f.seek(size // 2)
      f.write(bytes(b ^ 0xFF for b in data))
  elif how == 'truncate':
    os.truncate(path, size // 2)
  elif how == 'empty':
    os.truncate(path, 0)
  else:
    assert how == 'delete', how
    os.remove(path)


def _target(step_dir: str, where: str) -> str:
  """A file of a step by role: 'ITEM/chunk' (its largest data file: array chunks),
  'ITEM/root' (the OCDBT root node), or a path relative to the step."""
  item, _, kind = where.rpartition('/')
  if kind in ('chunk', 'root'):
    folder = os.path.join(step_dir, item, 'ocdbt.process_0' if kind == 'chunk' else '', 'd')
    return max((os.path.join(folder, n) for n in os.listdir(folder)), key=os.path.getsize)
  return os.path.join(step_dir, where)


# (file, damage, what it breaks): 'all' = eval and resume refuse the step; 'resume' = only a
# reader of the whole training state notices (eval reads params and metadata alone, which are
# intact); 'none' = a file no reader needs (the arrays read still match their checksums).
CASES = [
    ('params/chunk', 'flip', 'all'),
    ('params/chunk', 'truncate', 'all'),
    ('params/chunk', 'delete', 'all'),
    ('params/root', 'flip', 'all'),
    ('params/manifest.ocdbt', 'truncate', 'all'),
    ('params/_METADATA', 'empty', 'all'),
    ('params/_METADATA', 'delete', 'all'),
    ('params/_sharding', 'truncate', 'all'),
    ('params/array_metadatas/process_0', 'truncate', 'all'),
    ('metadata/metadata', 'empty', 'all'),
    ('metadata/metadata', 'delete', 'all'),
    ('_CHECKPOINT_METADATA', 'truncate', 'all'),
    ('opt_state/chunk', 'flip', 'resume'),
    ('opt_state/chunk', 'delete', 'resume'),
    ('opt_state/_METADATA', 'truncate', 'resume'),
    ('opt_state/manifest.ocdbt', 'delete', 'resume'),
    ('ema_params/chunk', 'flip', 'resume'),
    ('ema_params/_sharding', 'empty', 'resume'),
    ('train/metadata', 'empty', 'resume'),
    ('train/metadata', 'delete', 'resume'),
    ('params/_sharding', 'delete', 'none'),
    ('_CHECKPOINT_METADATA', 'delete', 'none'),
    ('commit_success.txt', 'delete', 'none'),
]


# The only step damaged: one case of each item and of each outcome (the reading is the same).
ONLY_STEP = {('params/chunk', 'flip'), ('opt_state/chunk', 'flip'), ('ema_params/chunk', 'flip'),
             ('metadata/metadata', 'empty'), ('train/metadata', 'delete'),
             ('_CHECKPOINT_METADATA', 'truncate'), ('commit_success.txt', 'delete')}
PARAMS = [pytest.param(w, h, b, False, id=f'{w}-{h}-newest') for w, h, b in CASES] + [
    pytest.param(w, h, b, True, id=f'{w}-{h}-only') for w, h, b in CASES if (w, h) in ONLY_STEP]


@pytest.mark.parametrize('where,how,breaks,only_step', PARAMS)
def test_damaged_step(run, intact, tmp_path, caplog, where, how, breaks, only_step):
  workdir = _copy(run, tmp_path, only_newest=only_step)
  root = os.path.join(workdir, 'checkpoints')
  step4 = os.path.join(root, '4')
  damaged_file = _target(step4, where)
  _damage(damaged_file, how)
  moved_file = damaged_file.replace(step4, step4 + '.corrupt-1')

  # verify: every damage that breaks a reader is reported, naming the step.
  check = checkpoints.check_step(step4)
  assert check.ok == (breaks == 'none'), check.problems

  # eval / init_from / convert / visualize (load_params).
  if breaks == 'all':
    with pytest.raises(checkpoints.DamagedCheckpointError) as error:
      checkpoints.load_params(step4)
    message = str(error.value)
    assert message.startswith(f'checkpoint {step4} is damaged: '), message
    if only_step:
      assert f'No earlier step of {workdir} has parameters that verify' in message
    else:
      assert (f'The newest earlier step whose parameters verify is 2: evaluate it with '
              f'--config.eval_checkpoint={root}/2') in message
  else:  # the parameters it reads are intact and come back exactly
    _assert_bitwise(_flat(checkpoints.load_params(step4)[0]), intact[4][1])

  # resume.
  if breaks == 'none':
    state = _resume(run, workdir)
    assert int(state.step) == 4
    for item in ITEMS:
      _assert_bitwise(_flat(getattr(state, item)), intact[4][0][item], item)
    assert sorted(os.listdir(root)) == (['4'] if only_step else ['2', '4'])
  elif only_step:
    with pytest.raises(checkpoints.CheckpointError) as error:
      _resume(run, workdir)
    message = str(error.value)
    assert message.startswith(f'no intact checkpoint to resume from under {root}; tried:\n'
                              '  step 4: '), message
    assert 'Nothing was moved or deleted.' in message
    assert sorted(os.listdir(root)) == ['4']  # left where it was
    assert os.path.exists(damaged_file) == (how != 'delete')
  else:
    with caplog.at_level(logging.WARNING):
      state = _resume(run, workdir)
    assert int(state.step) == 2
    for item in ITEMS:
      _assert_bitwise(_flat(getattr(state, item)), intact[2][0][item], item)
    assert f'cannot resume from step 4: checkpoint {step4} is damaged: ' in caplog.text
    assert f'moved damaged checkpoint {step4} to {step4}.corrupt-1' in caplog.text
    assert 'resuming from step 2, the newest intact checkpoint' in caplog.text
    assert sorted(os.listdir(root)) == ['2', '4.corrupt-1']  # moved aside, not deleted
    assert os.path.exists(moved_file) == (how != 'delete')
    # And orbax no longer sees it: a second resume goes straight to step 2.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert int(_resume(run, workdir).step) == 2
    assert 'cannot resume' not in caplog.text


def test_problems_name_the_array_and_the_file(run, tmp_path):
  workdir = _copy(run, tmp_path)
  step4 = os.path.join(workdir, 'checkpoints', '4')
  _damage(_target(step4, 'opt_state/_METADATA'), 'empty')
  assert checkpoints.check_step(step4).problems == ['opt_state/_METADATA is empty']
  _damage(_target(step4, 'train/metadata'), 'delete')
  assert checkpoints.check_step(step4).problems == ['opt_state/_METADATA is empty']  # first
  step2 = os.path.join(workdir, 'checkpoints', '2')
  _damage(_target(step2, 'ema_params/chunk'), 'flip')
  problems = checkpoints.check_step(step2).problems
  # The largest chunk holds several arrays; the flipped bytes changed one of them.
  assert len(problems) == 1, problems
  assert re.fullmatch(r'ema_params/[\w/]+: crc32 [0-9a-f]{8} of the data read, [0-9a-f]{8} '
                      r'when saved \(the bytes changed on disk\)', problems[0]), problems


# -- whole runs and commands ----------------------------------------------------------------


def test_resume_past_a_damaged_step_ends_like_the_uninterrupted_run(run, tmp_path):
  """A damaged newest step: the rerun resumes from step 2, redoes steps 3 and 4, and ends
  bitwise where the uninterrupted run did (metrics and step 4's parameters)."""
  damaged = str(tmp_path / 'damaged')
  shutil.copytree(run['workdir'], damaged)
  _damage(_target(os.path.join(damaged, 'checkpoints', '4'), 'params/chunk'), 'flip')
  result = train.train_and_evaluate(run['config'], damaged, devices=jax.devices()[:1])
  result.pop('images_per_second')
  expected = dict(run['metrics'])
  expected.pop('images_per_second')
  assert result == expected
  step4 = lambda w: _flat(checkpoints.load_params(os.path.join(w, 'checkpoints', '4'))[0])
  _assert_bitwise(step4(damaged), step4(run['workdir']))
  assert sorted(os.listdir(os.path.join(damaged, 'checkpoints'))) == ['2', '4', '4.corrupt-1']


def test_nonfinite_message_names_a_checkpoint_only_if_it_verifies(run, tmp_path):
  nan = jnp.float32(np.nan)
  state = run['state'].replace(nonfinite_steps=jnp.int32(1), first_nonfinite=jnp.int32(5),
                               nonfinite_terms=jnp.stack([nan, jnp.float32(0), nan]))
  for only_step, expected in ((False, 'Last good checkpoint: {root}/2.'),
                              (True, 'Last good checkpoint: none that verifies (`python -m '
                                     'avit_jax.checkpoints verify {workdir}` says why).')):
    workdir = _copy(run, tmp_path / str(only_step), only_newest=only_step)
    root = os.path.join(workdir, 'checkpoints')
    _damage(_target(os.path.join(root, '4'), 'opt_state/chunk'), 'flip')
    manager = checkpoints.TrainCheckpoints(workdir, keep=10, async_save=False)
    try:
      with pytest.raises(train.NonFiniteLossError) as error:
        train.check_finite(state, run['config'], 0, manager)
    finally:
      manager.close()
    assert expected.format(root=root, workdir=workdir) in str(error.value)


def test_verify_command(run, tmp_path, capsys):
  workdir = _copy(run, tmp_path)
  root = os.path.join(workdir, 'checkpoints')
  assert checkpoints.main(['verify', workdir]) == 0
  assert capsys.readouterr().out == (f'{root}/2: OK (130 arrays match their checksums)\n'
                                     f'{root}/4: OK (130 arrays match their checksums)\n'
                                     '2 of 2 checkpoint(s) intact\n')
  _damage(_target(os.path.join(root, '4'), 'train/metadata'), 'empty')
  shutil.copytree(os.path.join(root, '2'), os.path.join(root, '2.corrupt-1'))
  assert checkpoints.main(['verify', workdir]) == 1
  assert capsys.readouterr().out == (f'{root}/2: OK (130 arrays match their checksums)\n'
                                     f'{root}/4: DAMAGED\n  train/metadata is empty\n'
                                     f'{root}/2.corrupt-1: not checked (moved aside as '
                                     'damaged)\n1 of 2 checkpoint(s) intact, 1 damaged\n')
  assert checkpoints.main(['verify', os.path.join(root, '2')]) == 0
  assert capsys.readouterr().out.startswith(f'{root}/2: OK')
  assert checkpoints.main(['verify', str(tmp_path)]) == 2
  assert capsys.readouterr().err == (
      f'error: {tmp_path} is neither a checkpoint (a directory with params/) nor a training '
      'workdir (a directory with checkpoints/<step>/)\n')


def test_eval_of_a_damaged_newest_step_exits_nonzero_and_keeps_eval_json(run, tmp_path):
  """`python -m avit_jax.main --mode eval` on a workdir whose newest step has flipped bytes
  in a parameter chunk: exit status 1, one error line naming the step and the intact one,
  eval.json and config.json untouched."""
  workdir = _copy(run, tmp_path)
  step4 = os.path.join(workdir, 'checkpoints', '4')
  _damage(_target(step4, 'params/chunk'), 'flip')
  before = {n: open(os.path.join(workdir, n), 'rb').read() for n in ('eval.json', 'config.json')}
  args = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run([sys.executable, '-m', 'avit_jax.main', '--config',
                           'configs/fashion_mnist.py', '--workdir', workdir, '--mode', 'eval',
                           *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: checkpoint {step4} is damaged: params/'), last
  assert f'--config.eval_checkpoint={workdir}/checkpoints/2' in last
  assert 'Traceback' not in result.stderr
  after = {n: open(os.path.join(workdir, n), 'rb').read() for n in before}
  assert after == before
  # Evaluation moves nothing aside.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_unreadable_directories_give_one_clear_error(tmp_path):
  (tmp_path / 'empty_params' / 'params').mkdir(parents=True)
  with pytest.raises(checkpoints.DamagedCheckpointError) as error:
    checkpoints.load_params(str(tmp_path / 'empty_params'))
  assert str(error.value).startswith(f'checkpoint {tmp_path}/empty_params is damaged: params/ '
                                     'cannot be read (')
  assert 'Write it again' in str(error.value)
  with pytest.raises(checkpoints.CheckpointError, match='is not an avit_jax checkpoint'):
    checkpoints.load_params(str(tmp_path))


# -- arrays split over devices (mesh.fsdp = 8), several processes, gs:// paths --------------


def _shard_crc32s(value: np.ndarray, dim: int, parts: int = 8) -> dict[str, str]:
  """{'0:32,16:32': crc32}: `value` cut in `parts` equal slices along `dim`, by hand."""
  size = value.shape[dim] // parts
  out = {}
  for k in range(parts):
    bounds = [(0, n) for n in value.shape]
    bounds[dim] = (k * size, (k + 1) * size)
    piece = value[tuple(slice(a, b) for a, b in bounds)]
    out[','.join(f'{a}:{b}' for a, b in bounds)] = (
        f'{zlib.crc32(np.ascontiguousarray(piece).tobytes()):08x}')
  return out


def test_fsdp_save_records_one_crc32_per_shard(run, intact, tmp_path):
  """The trained state split over the 8 devices and saved by the trainer: each split array
  has one crc32 per shard, equal to the crc32 of that numpy slice; every reader verifies."""
  mesh = fsdp_mesh()
  shardings = train.state_shardings(mesh, run['state'])
  state = jax.device_put(_resume(run, run['workdir']), shardings)
  workdir = str(tmp_path / 'fsdp')
  manager = checkpoints.TrainCheckpoints(workdir, keep=10, async_save=False)
  try:
    train.save_checkpoint(manager, state, run['config'], steps_per_epoch=100)
  finally:
    manager.close()
  step4 = os.path.join(workdir, 'checkpoints', '4')
  with open(os.path.join(step4, 'metadata', 'metadata')) as f:
    field = json.load(f)['checksums']
  split = 0
  for item in ITEMS:
    tree = getattr(state, item)
    tree = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert len(field['arrays'][item]) == len(leaves)
    for path, x in leaves:
      name, value = checkpoints.integrity.path_name(path), np.asarray(x)
      record = field['arrays'][item][name]
      head = {'dtype': str(value.dtype), 'shape': list(value.shape)}
      if 'fsdp' in tuple(x.sharding.spec):
        split += 1
        shards = _shard_crc32s(value, tuple(x.sharding.spec).index('fsdp'))
        assert record == {**head, 'shards': shards}, (item, name)
      else:  # replicated (no dimension divides by 8, or a scalar): one crc32, as before
        crc = f'{zlib.crc32(np.ascontiguousarray(value).tobytes()):08x}'
        assert record == {**head, 'crc32': crc}, (item, name)
  # Per item, the arrays with a dimension divisible by 8 (all but the head's bias and the
  # step counts), in params, ema_params and AdamW's mu and nu.
  assert split == 4 * 31
  # Read onto one host: every shard of every array is checked, and the values are the state's.
  check = checkpoints.check_step(step4)
  assert check.ok and check.arrays_verified == 130, check.problems
  _assert_bitwise(_flat(checkpoints.load_params(step4)[0]), intact[4][1])
  # Resumed onto the same split: each shard checked where it is held.
  resumed = _resume_onto(run, workdir, shardings)
  assert int(resumed.step) == 4
  for item in ITEMS:
    _assert_bitwise(_flat(getattr(resumed, item)), intact[4][0][item], item)
    assert all('fsdp' in tuple(x.sharding.spec) for x in jax.tree.leaves(
        getattr(resumed, item)) if x.ndim == 2)


def _resume_onto(run, workdir, shardings):
  manager = checkpoints.TrainCheckpoints(workdir, keep=10, async_save=False)
  try:
    return train.restore_or_init(manager, run['state'], shardings)
  finally:
    manager.close()


@pytest.fixture(scope='module')
def split_workdir(tmp_path_factory):
  """A trainer workdir with steps 2 and 4 of split_trees saved split over the 8 devices."""
  workdir = str(tmp_path_factory.mktemp('split'))
  mesh = fsdp_mesh()
  manager = checkpoints.TrainCheckpoints(workdir, keep=10, async_save=False)
  try:
    for step in (2, 4):
      params, opt_state = split_trees(step)
      put = lambda t: jax.device_put(t, sharding.tree_shardings(mesh, t))
      manager.save(step, params=put(params), opt_state=put(opt_state), ema_params=None,
                   train={'step': step}, metadata={'source': 'test'})
  finally:
    manager.close()
  return workdir


def _crc(value) -> str:
  return f'{zlib.crc32(np.ascontiguousarray(value).tobytes()):08x}'


def _restore_raw(step_dir: str, abstract) -> dict:
  """params of a step as orbax restores them onto `abstract`, unverified."""
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(step_dir, ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))['params']


def _resume_split(workdir: str):
  mesh = fsdp_mesh()
  params, opt_state = split_trees(2)
  manager = checkpoints.TrainCheckpoints(workdir, keep=10, async_save=False)
  try:
    return manager.restore_latest(abstract_params=abstract_tree(params, mesh),
                                  abstract_opt_state=abstract_tree(opt_state, mesh))
  finally:
    manager.close()


def test_a_byte_flipped_in_one_shard_is_found_and_resume_falls_back(split_workdir, tmp_path,
                                                                     caplog):
  workdir = str(tmp_path / 'workdir')
  shutil.copytree(split_workdir, workdir)
  root = os.path.join(workdir, 'checkpoints')
  step4 = os.path.join(root, '4')
  params4 = split_trees(4)[0]
  damaged = flip_in_shard(step4, params4['w'], ((0, 64), (192, 256)))
  saved, read = _crc(params4['w'][:, 192:256]), _crc(damaged[:, 192:256])
  assert read != saved
  with open(os.path.join(step4, 'metadata', 'metadata')) as f:
    assert json.load(f)['checksums']['arrays']['params']['w']['shards']['0:64,192:256'] == saved
  line = (f'params/w[0:64,192:256]: crc32 {read} of the data read, {saved} when saved (the '
          'bytes changed on disk)')

  # Read onto one host (numpy): the array sliced by every recorded index.
  assert checkpoints.check_step(step4).problems == [line]
  with pytest.raises(checkpoints.DamagedCheckpointError) as error:
    checkpoints.load_params(step4)
  assert str(error.value).startswith(f'checkpoint {step4} is damaged: {line}. The newest '
                                    'earlier step whose parameters verify is 2')
  # Restored split: on the saved layout, on 4 devices (each shard holds two recorded ones)
  # and split along the other dimension (recorded shards span several: the whole array).
  recorded = checkpoints.check_step(os.path.join(root, '2'))
  assert recorded.ok and recorded.arrays_verified == 4
  with open(os.path.join(step4, 'metadata', 'metadata')) as f:
    records = json.load(f)['checksums']['arrays']['params']
  mesh4 = sharding.make_mesh(_config(**{'mesh.fsdp': 4}).mesh, jax.devices()[:4])
  rows = jax.sharding.NamedSharding(fsdp_mesh(), jax.sharding.PartitionSpec('fsdp', None))
  for abstract in (abstract_tree(params4, fsdp_mesh()), abstract_tree(params4, mesh4),
                   {**abstract_tree(params4, fsdp_mesh()),
                    'w': jax.ShapeDtypeStruct((64, 512), np.int32, sharding=rows)}):
    restored = _restore_raw(step4, abstract)
    assert restored['w'].sharding == abstract['w'].sharding
    assert checkpoints.integrity.compare('params', restored, records) == [line]

  # Resume: step 4 is damaged, step 2 restores intact and the run goes on from it.
  with caplog.at_level(logging.WARNING):
    restored = _resume_split(workdir)
  assert restored['train'] == {'step': 2}
  params2, opt_state2 = split_trees(2)
  _assert_bitwise(_flat(restored['params']), _flat(params2))
  _assert_bitwise(_flat(restored['opt_state']), _flat(opt_state2))
  assert f'cannot resume from step 4: checkpoint {step4} is damaged: {line}.' in caplog.text
  assert f'moved damaged checkpoint {step4} to {step4}.corrupt-1' in caplog.text
  assert 'resuming from step 2, the newest intact checkpoint' in caplog.text
  assert sorted(os.listdir(root)) == ['2', '4.corrupt-1']


def _whole_array_records(step_dir: str, trees: dict) -> None:
  """Rewrites a step's checksums as written before per-shard records: one crc32 per array."""
  path = os.path.join(step_dir, 'metadata', 'metadata')
  with open(path) as f:
    metadata = json.load(f)
  metadata['checksums']['arrays'] = {
      item: {name: {'crc32': f'{zlib.crc32(np.ascontiguousarray(v).tobytes()):08x}',
                    'dtype': str(v.dtype), 'shape': list(v.shape)}
             for name, v in _flat(tree).items()}
      for item, tree in trees.items()}
  with open(path, 'w') as f:
    json.dump(metadata, f)


def test_whole_array_records_still_verify(split_workdir, tmp_path, caplog):
  workdir = str(tmp_path / 'workdir')
  shutil.copytree(split_workdir, workdir)
  root = os.path.join(workdir, 'checkpoints')
  for step in (2, 4):
    params, opt_state = split_trees(step)
    _whole_array_records(os.path.join(root, str(step)), {'params': params,
                                                         'opt_state': opt_state})
  check = checkpoints.check_step(os.path.join(root, '4'))
  assert check.ok and check.arrays_verified == 4
  with caplog.at_level(logging.WARNING):
    assert _resume_split(workdir)['train'] == {'step': 4}
  assert 'cannot resume' not in caplog.text
  # The same damage, named for the whole array.
  params4 = split_trees(4)[0]
  damaged = flip_in_shard(os.path.join(root, '4'), params4['w'], ((0, 64), (192, 256)))
  line = (f'params/w: crc32 {_crc(damaged)} of the data read, {_crc(params4["w"])} when '
          'saved (the bytes changed on disk)')
  assert checkpoints.check_step(os.path.join(root, '4')).problems == [line]
  with caplog.at_level(logging.WARNING):
    assert _resume_split(workdir)['train'] == {'step': 2}
  assert f'is damaged: {line}.' in caplog.text


def test_checkpoint_paths_may_be_urls(run, tmp_path, capsys, monkeypatch):
  """gs://bucket/... paths go through etils.epath: here mocked onto a local copy of the run
  (orbax's TensorStore reads cannot be mocked, so the checks stop at the JSON files)."""
  # epath sends gs:// to TensorFlow's gfile when TensorFlow is installed, past its mock.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  local = str(tmp_path / 'bucket')
  shutil.copytree(run['workdir'], os.path.join(local, 'run'))
  to_local = lambda p: str(p).replace('gs://bucket', local, 1)
  same = lambda fn, path, *args, **kwargs: fn(to_local(path), *args, **kwargs)
  with epath_testing.mock_epath(exists=same, isdir=same, listdir=same, open=same, stat=same,
                                rename=lambda fn, path, dst: fn(to_local(path), to_local(dst))):
    root = 'gs://bucket/run/checkpoints'
    assert checkpoints.latest_step_dir('gs://bucket/run') == f'{root}/4'
    assert checkpoints.resolve_checkpoint('gs://bucket/run/') == f'{root}/4'
    assert checkpoints.resolve_checkpoint(f'{root}/2') == f'{root}/2'
    with pytest.raises(checkpoints.CheckpointError) as error:
      checkpoints.load_params('gs://bucket/run')
    assert str(error.value).startswith('gs://bucket/run is not an avit_jax checkpoint')
    assert str(error.value).endswith(f'point at one of its steps, e.g. {root}/<step>.')
    _damage(os.path.join(local, 'run', 'checkpoints', '4', 'train', 'metadata'), 'empty')
    assert checkpoints.check_step(f'{root}/4').problems == ['train/metadata is empty']
    assert checkpoints.layout.move_aside(f'{root}/2') == f'{root}/2.corrupt-1'
    assert checkpoints.main(['verify', 'gs://bucket/run']) == 1
    assert capsys.readouterr().out == (f'{root}/4: DAMAGED\n  train/metadata is empty\n'
                                       f'{root}/2.corrupt-1: not checked (moved aside as '
                                       'damaged)\n0 of 1 checkpoint(s) intact, 1 damaged\n')
  assert sorted(os.listdir(os.path.join(local, 'run', 'checkpoints'))) == ['2.corrupt-1', '4']


TWO_PROCESSES = textwrap.dedent('''
    import os, sys
    process_id, port, workdir = sys.argv[1:]
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
    from avit_jax import distributed
    distributed.initialize(f'127.0.0.1:{port}', 2, int(process_id))
    import jax
    import numpy as np
    from avit_jax import checkpoints
    from avit_jax.training import sharding
    from tests.helpers import abstract_tree, flip_in_shard, fsdp_mesh, split_trees

    mesh = fsdp_mesh()  # 8 devices, 4 on each process
    put = lambda t: jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), t,
        sharding.tree_shardings(mesh, t))
    manager = checkpoints.TrainCheckpoints(workdir, keep=10, async_save=False)
    for step in (2, 4):
      params, opt_state = split_trees(step)
      manager.save(step, params=put(params), opt_state=put(opt_state), ema_params=None,
                   train={'step': step}, metadata={})
    w = put(split_trees(4)[0])['w']
    held = {(s.index[1].start, s.index[1].stop) for s in w.addressable_shards}
    assert ((448, 512) in held) == (jax.process_index() == 1), held
    if jax.process_index() == 0:  # damage a shard that only process 1 reads
      flip_in_shard(os.path.join(workdir, 'checkpoints', '4'), split_trees(4)[0]['w'],
                    ((0, 64), (448, 512)))
    distributed.agree(True)
    params, opt_state = split_trees(2)
    restored = manager.restore_latest(abstract_params=abstract_tree(params, mesh),
                                      abstract_opt_state=abstract_tree(opt_state, mesh))
    w = restored['params']['w']
    assert not w.is_fully_addressable
    for s in w.addressable_shards:
      np.testing.assert_array_equal(np.asarray(s.data), params['w'][s.index])
    print('resumed from', restored['train']['step'], 'last good', manager.last_good_step(),
          flush=True)
    manager.close()
''')


@pytest.mark.processes
def test_two_processes_record_every_shard_and_agree_on_a_damaged_one(tmp_path):
  """2 processes x 4 devices, arrays split over all 8: the saved record holds the crc32s
  of both processes' shards; a shard damaged where process 1 alone reads it sends both
  processes back to step 2; the damage is found again when read onto one host."""
  workdir = str(tmp_path / 'workdir')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen([sys.executable, '-c', TWO_PROCESSES, str(i), str(port), workdir],
                            env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  root = os.path.join(workdir, 'checkpoints')
  step4 = os.path.join(root, '4')
  params4 = split_trees(4)[0]
  with open(os.path.join(root, '4.corrupt-1', 'metadata', 'metadata')) as f:
    records = json.load(f)['checksums']['arrays']
  assert records['params']['w']['shards'] == _shard_crc32s(params4['w'], 1)
  assert records['opt_state']['mu']['shards'] == _shard_crc32s(split_trees(4)[1]['mu'], 0)
  assert records['params']['b'] == {'crc32': _crc(params4['b']), 'dtype': 'float32',
                                    'shape': [10]}
  damaged = params4['w'].copy()
  piece = np.array(damaged[:, 448:512], order='C')
  piece.reshape(-1).view(np.uint8)[piece.nbytes // 2] ^= 0xFF
  line = (f'params/w[0:64,448:512]: crc32 {_crc(piece)} of the data read, '
          f'{_crc(params4["w"][:, 448:512])} when saved (the bytes changed on disk)')
  assert f'cannot resume from step 4: checkpoint {step4} is damaged: {line}.' in logs[1]
  assert ('cannot resume from step 4: another process found it damaged (its log names the '
          'problem)') in logs[0]
  assert f'moved damaged checkpoint {step4} to {step4}.corrupt-1' in logs[0]
  assert 'moved damaged checkpoint' not in logs[1]
  for log in logs:
    assert 'resuming from step 2, the newest intact checkpoint' in log
    assert 'resumed from 2 last good 2' in log
  assert sorted(os.listdir(root)) == ['2', '4.corrupt-1']
  # One host with one device: `verify` slices every shard out of the whole array.
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  result = subprocess.run([sys.executable, '-m', 'avit_jax.checkpoints', 'verify',
                           f'{step4}.corrupt-1'], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stdout == (f'{step4}.corrupt-1: DAMAGED\n  {line}\n'
                           '0 of 1 checkpoint(s) intact, 1 damaged\n')
  check = checkpoints.check_step(os.path.join(root, '2'))
  assert check.ok and check.arrays_verified == 4
