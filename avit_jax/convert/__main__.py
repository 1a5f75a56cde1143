"""python -m avit_jax.convert: PyTorch weights -> an avit_jax checkpoint (--config gives the
model), or with --to torch an avit_jax checkpoint -> timm-named .safetensors."""

from __future__ import annotations

import sys

from absl import app, flags

from avit_jax import command_line

_SRC = flags.DEFINE_string('src', None, 'PyTorch file / HF model dir, or (--to torch) an '
                           'avit_jax checkpoint directory')
_OUT = flags.DEFINE_string('out', None, 'output checkpoint directory, or (--to torch) '
                           '.safetensors file')
_TO = flags.DEFINE_enum('to', 'jax', ['jax', 'torch'], 'direction of the conversion')
_FORCE = flags.DEFINE_bool('force', False, 'replace an existing --out')
_CONFIG = flags.DEFINE_string('config', None, 'config file giving config.model (--to jax only); '
                              'any --config.a.b=value after it overrides a field')
_OVERRIDES: list[str] = []  # the --config.a.b=value arguments, set by _parse_flags


def _parse_flags(argv: list[str]) -> list[str]:
  rest, _OVERRIDES[:] = command_line.split_overrides(argv)
  return app.parse_flags_with_usage(rest)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; use --src, --out, --config')
  if not _SRC.value or not _OUT.value:
    raise app.UsageError('--src and --out are required')
  if _TO.value == 'jax' and _CONFIG.value is None:
    raise app.UsageError('--config is required to convert into avit_jax, e.g. '
                         '--config configs/tiny.py (it fixes the model geometry)')
  try:
    config = command_line.load_config(_CONFIG.value, _OVERRIDES) if _CONFIG.value else None
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  command_line.quiet_libraries()
  from avit_jax import checkpoints, convert  # pylint: disable=import-outside-toplevel

  try:
    if _TO.value == 'torch':
      path = convert.export_file(_SRC.value, _OUT.value, force=_FORCE.value)
    else:
      path = convert.convert_file(_SRC.value, config.model, _OUT.value, force=_FORCE.value)
  except (checkpoints.CheckpointError, FileExistsError) as e:
    # The message says what is wrong and how to fix it; a traceback would only hide it.
    sys.exit(f'error: {e}')
  print(f'Wrote {path}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
