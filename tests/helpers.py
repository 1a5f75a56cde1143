"""Shared by the tests that run commands in real processes (reliability, many hosts, gs://)."""

import os
import queue
import re
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CommandRun:
  """A command in its own process (default `python -m avit_jax.main ARGS`), its merged
  stdout and stderr read by a thread into `lines`. Every wait has a deadline that kills the
  process and fails the test; leaving a `with` block kills it if it still runs."""

  def __init__(self, args, *, env: dict, start=None, name: str = 'run'):
    start = start or [sys.executable, '-m', 'avit_jax.main']
    self.name = name
    self.proc = subprocess.Popen([*start, *map(str, args)], cwd=REPO, env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._queue: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.kill()

  def _read(self):
    for line in self.proc.stdout:
      self._queue.put(line)
    self._queue.put(None)

  def _drain(self, timeout: float) -> bool:
    """Reads output for up to `timeout` s; False once it has ended."""
    try:
      line = self._queue.get(timeout=timeout)
    except queue.Empty:
      return True
    if line is None:
      return False
    self.lines.append(line)
    return True

  @property
  def output(self) -> str:
    return ''.join(self.lines)

  def fail(self, why: str):
    self.kill()
    raise AssertionError(f'{self.name}: {why}; output:\n{self.output[-4000:]}')

  def wait_for(self, pattern: str, timeout: float = 300) -> None:
    """Until a line matches the regular expression `pattern`."""
    deadline = time.monotonic() + timeout
    while not any(re.search(pattern, line) for line in self.lines):
      if not self._drain(1.0):
        self.fail(f'ended without printing {pattern!r}')
      if time.monotonic() > deadline:
        self.fail(f'no {pattern!r} within {timeout} s')

  def wait_for_file(self, path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
      if time.monotonic() > deadline or self.proc.poll() is not None:
        self.fail(f'{path} never appeared')
      self._drain(0.05)

  def signal(self, sig: int) -> None:
    os.kill(self.proc.pid, sig)

  def finish(self, timeout: float = 300) -> int:
    """The exit status, once the process ended and all its output is read."""
    deadline = time.monotonic() + timeout
    while self._drain(1.0):
      if time.monotonic() > deadline:
        self.fail(f'still running after {timeout} s')
    return self.proc.wait()

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(timeout=30)
