"""Parameter checkpoints: what avit_jax.convert writes and init_from, evaluation,
visualisation and the benchmark read (a trainer step directory reads the same way)."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from avit_jax.checkpoints import integrity
from avit_jax.checkpoints.layout import (METADATA, PARAMS, VERIFY_COMMAND, CheckpointError,
                                         DamagedCheckpointError, absolute, is_checkpoint, join)
from avit_jax.checkpoints.reading import (local_reader, read_metadata, restore_item,
                                          verify_checksums, whole_on_host)


def save_params(directory: str, params: dict, metadata: dict, *, force: bool = False) -> str:
  """Writes a parameter checkpoint; refuses to overwrite an existing one unless `force`.

  params: nested dict of arrays; metadata: JSON-serialisable dict (the arrays' checksums
  are added to it). Returns the directory.
  """
  directory = absolute(directory)
  path = epath.Path(directory)
  if path.exists() and any(path.iterdir()):
    if not force:
      raise FileExistsError(f'{directory} exists and is not empty; pass --force to replace it '
                            'or choose another --out directory')
  params = jax.tree.map(np.asarray, params)
  metadata = {**metadata, integrity.FIELD: integrity.checksum_field({PARAMS: params})}
  # Orbax writes into a temporary directory and renames it on success, so a crash
  # mid-write never leaves a half-written checkpoint under `directory`.
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(path, ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        METADATA: ocp.args.JsonSave(metadata),
    }), force=force)
  return directory


def load_params(directory: str) -> tuple[dict, dict]:
  """Reads (params, metadata) from a parameter checkpoint or a trainer step directory, after
  checking the files it reads and the parameters' checksums (DamagedCheckpointError, naming
  the newest intact step of the workdir when there is one)."""
  directory = _existing_checkpoint(directory)
  try:
    return _read_params(directory)
  except DamagedCheckpointError as e:
    raise DamagedCheckpointError(directory, e.problems, _advice(directory)) from e


def load_metadata(directory: str) -> dict:
  """The metadata of a parameter checkpoint or trainer step ('model': its config.model, ...),
  without reading its arrays."""
  directory = _existing_checkpoint(directory)
  problems = integrity.json_problems(directory, (METADATA,))
  if problems:
    raise DamagedCheckpointError(directory, problems, _advice(directory))
  with local_reader(directory) as restore:
    metadata = read_metadata(directory, restore)
  metadata.pop(integrity.FIELD, None)
  return metadata


def _existing_checkpoint(directory: str) -> str:
  """`directory` made absolute; CheckpointError unless it holds a checkpoint."""
  directory = absolute(directory)
  if not epath.Path(directory).exists():
    raise CheckpointError(f'checkpoint {directory} does not exist (expected a directory '
                          'written by avit_jax.convert or a trainer step WORKDIR/checkpoints/'
                          '<step>)')
  if not is_checkpoint(directory):
    hint = ''
    if (epath.Path(directory) / 'checkpoints').is_dir():
      hint = (f' It looks like a training workdir: point at one of its steps, e.g. '
              f'{join(directory, "checkpoints", "<step>")}.')
    raise CheckpointError(f'{directory} is not an avit_jax checkpoint (expected a '
                          f'{PARAMS}/ subdirectory written by avit_jax.convert or the trainer).'
                          + hint)
  return directory


def _read_params(directory: str, *, warn: bool = True) -> tuple[dict, dict]:
  problems = integrity.json_problems(directory, (PARAMS, METADATA))
  if problems:
    raise DamagedCheckpointError(directory, problems)
  # Read on this process alone (no orbax barrier): a reader such as the figures step runs
  # on one process of a multi-process job.
  with local_reader(directory) as restore:
    metadata = read_metadata(directory, restore)
    params = restore_item(directory, restore, PARAMS, whole_on_host(directory, PARAMS))
  params = jax.tree.map(np.asarray, params)
  verify_checksums(directory, metadata, {PARAMS: params}, warn=warn)
  metadata.pop(integrity.FIELD, None)  # the readers' business only
  return params, metadata


def _advice(directory: str) -> str:
  """What to do about a damaged checkpoint: another step of its workdir, or rewriting it."""
  path = epath.Path(directory)
  root, name = str(path.parent), path.name
  if not (name.isdigit() and path.parent.name == 'checkpoints'):
    return (f'Write it again (e.g. `python -m avit_jax.convert ... --force`) or restore it from '
            f'a copy; `{VERIFY_COMMAND} {directory}` lists what is wrong.')
  workdir = str(path.parent.parent)
  steps = (int(p.name) for p in path.parent.iterdir() if p.name.isdigit())
  for step in sorted((s for s in steps if s < int(name)), reverse=True):
    try:
      _read_params(join(root, str(step)), warn=False)
    except CheckpointError:
      continue
    return (f'The newest earlier step whose parameters verify is {step}: evaluate it with '
            f'--config.eval_checkpoint={join(root, str(step))}; a training run on this '
            f'workdir moves step {name} aside and resumes from the newest intact step. '
            f'`{VERIFY_COMMAND} {workdir}` checks every step.')
  return (f'No earlier step of {workdir} has parameters that verify; retrain (a new --workdir) '
          f'or restore the workdir from a copy. `{VERIFY_COMMAND} {workdir}` checks every step.')
