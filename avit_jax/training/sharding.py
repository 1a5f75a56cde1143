"""Device mesh, batch and parameter shardings. No per-device loops: jit + NamedSharding.

The mesh has two axes, ('data', 'fsdp'). The batch is split over both; parameters and
optimizer state are replicated (`mesh.fsdp = 1`, the default) or, for large models,
each array's largest dimension divisible by the fsdp size is split over 'fsdp' (ZeRO-3
style: XLA inserts the all-gathers and reduce-scatters).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Mesh of all devices (or `devices`): data = mesh.data (-1: the rest), fsdp = mesh.fsdp."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  fsdp = int(mesh_config.fsdp)
  if fsdp < 1 or devices.size % fsdp:
    raise ValueError(f'mesh.fsdp={fsdp} must be >= 1 and divide the device count {devices.size}')
  data = devices.size // fsdp if mesh_config.data in (-1, None) else int(mesh_config.data)
  if data * fsdp != devices.size:
    raise ValueError(f'mesh.data * mesh.fsdp = {data} * {fsdp} must equal the device count '
                     f'{devices.size}; set mesh.data=-1 to use all devices')
  return Mesh(devices.reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """Replicated, or with fsdp > 1 split along the largest dimension it divides."""
  fsdp = mesh.shape['fsdp']
  if fsdp == 1 or not shape:
    return replicated(mesh)
  candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp == 0]
  if not candidates:
    return replicated(mesh)
  spec = [None] * len(shape)
  spec[int(candidates[0])] = 'fsdp'
  return NamedSharding(mesh, P(*spec))


def tree_shardings(mesh: Mesh, tree):
  """Shardings for a pytree of arrays (or ShapeDtypeStructs) under the fsdp rule."""
  return jax.tree.map(lambda x: param_sharding(mesh, tuple(np.shape(x))), tree)


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """This host's batch (numpy, leading axis = per-host share) -> global sharded jax arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
