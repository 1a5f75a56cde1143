"""The trainer's checkpoints: an orbax CheckpointManager under WORKDIR/checkpoints whose
resume verifies every array and falls back past damaged steps."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from avit_jax import distributed
from avit_jax.checkpoints import integrity
from avit_jax.checkpoints.layout import (METADATA, PARAMS, VERIFY_COMMAND, CheckpointError,
                                         DamagedCheckpointError, absolute, join, move_aside)
from avit_jax.checkpoints.reading import (check_step, check_train, local_reader, read_metadata,
                                          restore_item, verify_checksums)


class TrainCheckpoints:
  """The trainer's orbax CheckpointManager under WORKDIR/checkpoints (local or gs://).

  Each step directory holds `params` and `metadata` (so `load_params` reads it), plus
  `opt_state`, `ema_params` and `train` (JSON: step, epoch, seed, skipped steps). Keeps the
  last `keep` steps and the best by eval top-1; saves asynchronously. Saves record every
  array's checksum (one per shard for arrays split over devices); `restore_latest`
  verifies them and falls back past damaged steps.

  Several processes: every process calls `save` and `restore_latest` (both collective).
  Each process checksums and verifies the shards it holds; the processes agree on each
  step's verdict, and process 0 alone moves damaged steps aside.
  """

  ITEMS = (PARAMS, METADATA, 'opt_state', 'ema_params', 'train')

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    from orbax.checkpoint import checkpoint_managers

    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m['top1'], n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.directory = join(absolute(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(epath.Path(self.directory), options=options,
                                         item_names=self.ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return join(self.directory, str(step))

  def save(self, step: int, *, params, opt_state, ema_params, train: dict, metadata: dict,
           metrics: dict | None = None) -> None:
    """Saves `step` asynchronously, once (a step already saved is left as it is).

    params / ema_params: nnx.State or nested dicts of arrays; opt_state: optax state. The
    checksums are taken here, from host copies of these very arrays (of the shards this
    process holds), before the write starts. Collective: every process calls it.
    """
    if step in self.manager.all_steps():
      return
    to_pure = lambda s: nnx.to_pure_dict(s) if isinstance(s, nnx.State) else s
    arrays = {PARAMS: to_pure(params), 'opt_state': opt_state, 'ema_params': to_pure(ema_params)}
    metadata = {**metadata, integrity.FIELD: integrity.checksum_field(arrays)}
    items = {
        PARAMS: ocp.args.StandardSave(arrays[PARAMS]),
        METADATA: ocp.args.JsonSave(metadata),
        'opt_state': ocp.args.StandardSave(opt_state),
        'train': ocp.args.JsonSave(train),
    }
    if ema_params is not None:
      items['ema_params'] = ocp.args.StandardSave(arrays['ema_params'])
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore_latest(self, *, abstract_params, abstract_opt_state,
                     abstract_ema=None) -> dict | None:
    """The newest intact step restored onto abstract pytrees (ShapeDtypeStructs carrying
    shardings), or None when there is none yet. The one place a training step is read.

    A step that cannot be read or fails its checksums is logged and, once an older step
    restores intact, moved aside (`move_aside`); when no step is intact, nothing is moved
    and CheckpointError lists what was tried. Collective: a step found damaged by any
    process counts as damaged on every process, so all resume from the same step.

    abstract_params / abstract_ema: pure nested dicts. Returns {'params', 'opt_state',
    'ema_params' (None without EMA), 'train' (JSON: step, epoch, seed, nonfinite_steps)}.
    """
    damaged: list[DamagedCheckpointError] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      error = None
      try:
        restored = self._restore_step(step, abstract_params, abstract_opt_state, abstract_ema)
      except DamagedCheckpointError as e:
        logging.error('cannot resume from step %d: %s', step, e)
        error = e
      if not distributed.agree(error is None):
        if error is None:
          logging.error('cannot resume from step %d: another process found it damaged (its '
                        'log names the problem)', step)
          error = DamagedCheckpointError(self.step_dir(step), [
              'found damaged by another process (its log names the problem)'])
        damaged.append(error)
        continue
      if damaged:
        self._move_aside(damaged)
        logging.warning('resuming from step %d, the newest intact checkpoint', step)
      return restored
    if damaged:
      tried = '\n'.join(f'  step {epath.Path(e.directory).name}: '
                        f'{integrity.summary(e.problems)}' for e in damaged)
      raise CheckpointError(
          f'no intact checkpoint to resume from under {self.directory}; tried:\n{tried}\n'
          'Nothing was moved or deleted. To start this run over, move the damaged steps out '
          f'of {self.directory}, or train in a new --workdir (--config.init_from=<a '
          'checkpoint> starts from its parameters); '
          f'`{VERIFY_COMMAND} {epath.Path(self.directory).parent}` checks every step.')
    return None

  def _move_aside(self, damaged: list[DamagedCheckpointError]) -> None:
    """Process 0 renames the damaged steps; every process then forgets them (collective)."""
    failure = None
    if jax.process_index() == 0:
      try:
        for e in damaged:
          logging.warning('moved damaged checkpoint %s to %s (kept for inspection; delete '
                          'it when done)', e.directory, move_aside(e.directory))
      except OSError as e:
        failure = e
    # Also a barrier: no process lists the directory while process 0 renames in it.
    if not distributed.agree(failure is None):
      if failure is not None:
        raise failure
      raise CheckpointError(f'process 0 could not move the damaged steps of {self.directory} '
                            'aside (its log says why)')
    self.manager.reload()  # forget the moved steps: a new save of that step may follow

  def _restore_step(self, step: int, abstract_params, abstract_opt_state,
                    abstract_ema) -> dict:
    directory = self.step_dir(step)
    names = (PARAMS, METADATA, 'opt_state', 'train') + (('ema_params',) if abstract_ema else ())
    problems = integrity.json_problems(directory, names)
    if problems:
      raise DamagedCheckpointError(directory, problems)
    # Read on each process alone (no orbax barrier): a read that fails on one process must
    # not leave the others waiting; restore_latest agrees on the verdict afterwards.
    with local_reader(directory) as restore:
      metadata = read_metadata(directory, restore)
      trees = {PARAMS: restore_item(directory, restore, PARAMS,
                                     ocp.args.StandardRestore(abstract_params)),
               'opt_state': restore_item(directory, restore, 'opt_state',
                                          ocp.args.StandardRestore(abstract_opt_state))}
      if abstract_ema is not None:
        trees['ema_params'] = restore_item(directory, restore, 'ema_params',
                                            ocp.args.StandardRestore(abstract_ema))
      train = check_train(directory, restore_item(directory, restore, 'train',
                                                    ocp.args.JsonRestore()))
    verify_checksums(directory, metadata, trees)
    return {'params': trees[PARAMS], 'opt_state': trees['opt_state'],
            'ema_params': trees.get('ema_params'), 'train': train}

  def last_good_step(self) -> int | None:
    """The newest step that passes `check_step` on every process (after pending saves
    finish), or None. Collective with several processes."""
    self.manager.wait_until_finished()
    for step in sorted(self.manager.all_steps(), reverse=True):
      if distributed.agree(check_step(self.step_dir(step)).ok):
        return step
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
