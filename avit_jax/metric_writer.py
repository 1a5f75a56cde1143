"""TensorBoard scalars for a run, written by process 0 only (tensorboardX event files)."""

from __future__ import annotations


class MetricWriter:
  """`scalars(step, {name: value})` into WORKDIR event files; a no-op when not enabled."""

  def __init__(self, logdir: str, enabled: bool):
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir)

  def scalars(self, step: int, values: dict) -> None:
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, float(value), step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
