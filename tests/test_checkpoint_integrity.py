"""Checkpoint integrity: checksums recorded at save time and verified on every load; damaged
files in a real trained workdir (bytes flipped in an array chunk, truncated, deleted or
emptied files, for the newest step and for the only step) make resume fall back to the newest
intact step or stop with a clear error, make eval refuse, and never give wrong numbers;
nothing is deleted.

One tiny run (module fixture, with EMA so every item kind exists); every case works on a
copy of its workdir.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from avit_jax import checkpoints, train
from tests.test_reliability import FLAGS, REPO
from tests.test_train import tiny_config

# tests/test_reliability.py's tiny run, 4 steps with checkpoints 2 and 4 and an EMA.
OVERRIDES = {**FLAGS, 'num_train_steps': 4, 'eval_every_steps': 4, 'log_every_steps': 2,
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


@pytest.mark.slow  # two short trainings, 20 s on one core: compiling their steps
def test_resume_past_a_damaged_step_ends_like_an_undamaged_resume(run, tmp_path):
  """A damaged newest step: the rerun resumes from step 2 and ends bitwise where a rerun of
  an undamaged copy that resumes from step 2 ends (and where the uninterrupted run did)."""
  damaged = str(tmp_path / 'damaged')
  shutil.copytree(run['workdir'], damaged)
  _damage(_target(os.path.join(damaged, 'checkpoints', '4'), 'params/chunk'), 'flip')
  clean = str(tmp_path / 'clean')
  shutil.copytree(run['workdir'], clean)
  shutil.move(os.path.join(clean, 'checkpoints', '4'), str(tmp_path / 'step4_elsewhere'))
  results = {}
  for name, workdir in (('damaged', damaged), ('clean', clean)):
    results[name] = train.train_and_evaluate(run['config'], workdir, devices=jax.devices()[:1])
    results[name].pop('images_per_second')
  assert results['damaged'] == results['clean']
  expected = dict(run['metrics'])
  expected.pop('images_per_second')
  assert results['damaged'] == expected
  step4 = lambda w: _flat(checkpoints.load_params(os.path.join(w, 'checkpoints', '4'))[0])
  _assert_bitwise(step4(damaged), step4(clean))
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
