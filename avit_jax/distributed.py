"""Many processes, one run: starting `jax.distributed` the ways users launch JAX on many
hosts, and the few things the processes of a run must agree on (one verdict for all, a
preemption notice seen by all).

Every function here is safe in a single process, where it does no communication.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import signal
import socket
import time

import numpy as np
from absl import logging

# Environment variables by which SLURM, Open MPI, a TPU pod on GKE or a launcher that sets
# JAX's own variable announce a multi-process job; `jax.distributed.initialize()` reads the
# rest (addresses, ranks) itself.
CLUSTER_VARIABLES = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
                     'JAX_COORDINATOR_ADDRESS')


class DistributedError(RuntimeError):
  """Multi-process start-up failed (unreachable coordinator, inconsistent flags)."""


def _on_tpu_vm() -> bool:
  """Whether this is a Cloud TPU host (libtpu installed and TPU chips present). Checked from
  the file system, since asking JAX would start its backend before jax.distributed."""
  return (importlib.util.find_spec('libtpu') is not None
          and bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')))


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until `address` (host:port) accepts TCP connections; DistributedError naming it
  after `timeout_s`. JAX's own client aborts the process (no Python error) in that case."""
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  if not host or not port.isdigit():
    raise DistributedError(f'--coordinator_address={address!r}: expected HOST:PORT, e.g. '
                           '10.0.0.1:1234 (the address of process 0)')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f'cannot reach the coordinator at {address} within {timeout_s:.0f} s ({e}); '
            'start process 0 with the same --coordinator_address, check that this host can '
            'reach it, or raise --initialization_timeout') from e
      time.sleep(0.5)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, initialization_timeout: int = 300,
               heartbeat_timeout: int = 100) -> bool:
  """Starts jax.distributed when this is one process of many; returns whether it did.

  Three ways, as users start JAX on many hosts: explicit arguments (all three), a cluster
  JAX detects itself (SLURM, Open MPI, a TPU pod slice: no arguments), or nothing (one
  process). Touches no JAX backend before `jax.distributed.initialize`, as it requires.
  A process that loses another for `heartbeat_timeout` seconds is stopped by JAX.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and None in explicit:
    raise DistributedError('--coordinator_address, --num_processes and --process_id go '
                           'together: give all three (or none, on SLURM or a TPU pod)')
  announced = coordinator_address is not None or any(v in os.environ for v in CLUSTER_VARIABLES)
  tpu_vm = not announced and _on_tpu_vm()
  if not (announced or tpu_vm):
    return False
  import jax

  # Gloo is JAX's collective implementation for CPU devices; setting it starts no backend
  # and changes nothing on GPU or TPU.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # Only a process known not to be process 0 waits: process 0 starts the coordinator itself.
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  known_id = process_id if process_id is not None else os.environ.get('JAX_PROCESS_ID')
  if address and known_id is not None and int(known_id) != 0:
    wait_for_coordinator(address, initialization_timeout)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout)
  except ValueError as e:  # raised before connecting: the cluster's description is incomplete
    if tpu_vm:  # a single TPU host (e.g. Colab) has no pod metadata: it is one process
      logging.info('no TPU pod detected (%s): running as one process', e)
      return False
    raise DistributedError(f'jax.distributed could not find this job\'s processes ({e}); '
                           'pass --coordinator_address, --num_processes and --process_id') from e
  return True


def agree(ok: bool) -> bool:
  """True on every process when `ok` is True on every process, else False on all.
  Collective: every process of the run must call it at the same point."""
  import jax

  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils

  votes = multihost_utils.process_allgather(np.asarray(bool(ok), np.int32))
  return bool(np.all(votes))


def same_on_all(digest: bytes) -> bool:
  """Whether every process passed the same `digest` (e.g. a hash of its config); collective."""
  import jax

  if jax.process_count() == 1:
    return True
  from jax.experimental import multihost_utils

  mine = np.frombuffer(digest, np.uint8)
  return bool(np.all(multihost_utils.process_allgather(mine) == mine))


MESSAGE_BYTES = 4096


def message_from_chief(message: str | None) -> str | None:
  """Process 0's `message` (None: no message) on every process; collective. Lets an error
  found by process 0 alone (a workdir locked by another run) stop every process with the
  same words instead of leaving them waiting in a collective."""
  import jax

  if jax.process_count() == 1:
    return message
  from jax.experimental import multihost_utils

  data = np.zeros(MESSAGE_BYTES + 1, np.uint8)
  if message is not None:
    encoded = message.encode()[:MESSAGE_BYTES]
    data[0] = 1
    data[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data))
  if not data[0]:
    return None
  return bytes(data[1:]).rstrip(b'\0').decode(errors='replace')


class Preemption:
  """A preemption notice (SIGTERM) that every process acts on at the same step.

  Under jax.distributed, JAX's preemption sync point: a SIGTERM delivered to any one
  process makes `reached(step)` True on every process at one and the same step, so all
  save that step and stop together. In one process, a SIGTERM handler sets a flag that
  `reached` reads.
  """

  def __init__(self):
    import jax

    self._synced = jax.distributed.is_initialized()
    self._requested = False
    self._previous = None
    if not self._synced:
      # JAX's sync manager installs its own SIGTERM handler; a Python one would replace it.
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint before exiting')
    self._requested = True

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop. Every process must call it at every step."""
    if self._synced:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
