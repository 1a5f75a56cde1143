"""Orbax checkpoints: parameter checkpoints (conversion, init_from, eval) and the trainer's
CheckpointManager with resume. Builds no model.

Layout shared by every writer, so any of them can be read by `load_params`:
  DIR/params/         orbax StandardCheckpointer tree: nested dict of float32 numpy arrays
                      with the model's nnx attribute paths (timm names).
  DIR/metadata/       orbax JSON: {'model': config.model as a dict, 'source': ...,
                      'checksums': crc32 (one per shard for an array split over
                      devices), dtype and shape of every saved array, ...}
A trainer step directory WORKDIR/checkpoints/<step>/ has the same two items plus the
optimizer state, so `init_from` and evaluation accept either kind of directory.

Every read is verified: the JSON files it needs must parse and the arrays must match the
checksums recorded when they were written; a checkpoint that fails raises
DamagedCheckpointError. Checkpoints written before checksums load with a warning.
`python -m avit_jax.checkpoints verify DIR` checks a checkpoint or every step of a workdir.
DIR may be local or a URL such as gs://bucket/run (paths go through etils.epath).

Modules: layout (item names, errors, finding steps), integrity (checksums), reading
(verified reads of one directory), params (parameter checkpoints), fit (parameters against a
model), finetune (parameters fitted to another class count, image size or token set), trainer (TrainCheckpoints: save, resume with fallback), verify (the command).
"""

from avit_jax.checkpoints.fit import assign_params, metadata_json, misfit_message, nest_like
from avit_jax.checkpoints.layout import (ARRAY_ITEMS, JSON_ITEMS, METADATA, PARAMS,
                                         VERIFY_COMMAND, CheckpointError,
                                         DamagedCheckpointError, is_checkpoint,
                                         latest_step_dir, move_aside, resolve_checkpoint)
from avit_jax.checkpoints.params import load_metadata, load_params, save_params
from avit_jax.checkpoints.reading import StepCheck, check_step
from avit_jax.checkpoints.trainer import TrainCheckpoints
from avit_jax.checkpoints.verify import main
