"""`python -m avit_jax.checkpoints verify DIR`: checks a checkpoint, or every step of a
training workdir, and says what is wrong with each damaged one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from etils import epath

from avit_jax.checkpoints.layout import CheckpointError, PARAMS, absolute, is_checkpoint, join
from avit_jax.checkpoints.reading import check_step, silence_abandoned_reads


def _directories_to_check(path: str) -> tuple[list[str], list[str]]:
  """(checkpoint directories under `path`, notes on entries that are not checked): `path`
  itself when it is a checkpoint, else every step of a workdir (or of its checkpoints/)."""
  path = absolute(path)
  if is_checkpoint(path):
    return [path], []
  root = join(path, 'checkpoints')
  if not epath.Path(root).is_dir() and epath.Path(path).name == 'checkpoints':
    root = path
  if not epath.Path(root).is_dir():
    raise CheckpointError(
        f'{path} is neither a checkpoint (a directory with {PARAMS}/) nor a training workdir '
        '(a directory with checkpoints/<step>/)')
  names = sorted((p.name for p in epath.Path(root).iterdir()),
                 key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
  steps = [join(root, n) for n in names if n.isdigit()]
  notes = [f'{join(root, n)}: not checked ('
           + ('moved aside as damaged' if '.corrupt-' in n else 'unfinished write' if
              '.orbax-checkpoint-tmp' in n else 'not a step directory') + ')'
           for n in names if not n.isdigit()]
  if not steps:
    raise CheckpointError(f'no step directories under {root} (expected e.g. {root}/1000)')
  return steps, notes


def main(argv: Sequence[str] | None = None) -> int:
  """`verify DIR`: prints OK or what is wrong for each checkpoint; 1 if any is damaged."""
  parser = argparse.ArgumentParser(prog='python -m avit_jax.checkpoints',
                                   description='Checks avit_jax checkpoints.')
  commands = parser.add_subparsers(dest='command', required=True)
  verify = commands.add_parser(
      'verify', help='read every item of a checkpoint and compare each array with the '
      'checksum recorded when it was saved')
  verify.add_argument('dir', help='a checkpoint (step directory or parameter checkpoint) or a '
                      'training workdir (every step is checked); local or a URL such as '
                      'gs://bucket/run')
  args = parser.parse_args(argv)
  # Reading damaged steps abandons orbax reads whose late failures would print after the
  # verdict ('Event loop is closed'); from the start, so no read goes unfiltered.
  silence_abandoned_reads()
  try:
    directories, notes = _directories_to_check(args.dir)
  except CheckpointError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  damaged = 0
  for directory in directories:
    result = check_step(directory)
    if not result.ok:
      damaged += 1
      print(f'{directory}: DAMAGED\n' + '\n'.join(f'  {p}' for p in result.problems))
    elif result.arrays_verified:
      print(f'{directory}: OK ({result.arrays_verified} arrays match their checksums)')
    else:
      print(f'{directory}: OK but unverified (written before checksums were recorded: every '
            'file reads, the values cannot be checked)')
  for note in notes:
    print(note)
  print(f'{len(directories) - damaged} of {len(directories)} checkpoint(s) intact'
        + (f', {damaged} damaged' if damaged else ''))
  return 1 if damaged else 0
