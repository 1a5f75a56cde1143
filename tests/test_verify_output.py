"""`python -m avit_jax.checkpoints verify` prints its verdicts and nothing after them: the
late failures of orbax reads it abandoned on a damaged step are filtered from its start,
and every other unraisable exception still reaches stderr."""

import subprocess
import sys
import textwrap

from tests.helpers import REPO

SCRIPT = textwrap.dedent('''
    import sys, types
    from avit_jax.checkpoints import verify

    assert verify.main(['verify', sys.argv[1]]) == 2  # a directory that is not there
    assert getattr(sys.unraisablehook, 'avit_jax_filter', False), 'verify installed no filter'

    # What asyncio reports when an orbax read finishes after its event loop closed.
    sys.unraisablehook(types.SimpleNamespace(
        exc_type=RuntimeError, exc_value=RuntimeError('Event loop is closed'),
        exc_traceback=None, err_msg=None, object=None))
    # A coroutine of an abandoned array read, collected with its exception.
    async def _read_array_index_and_device_put():
      pass
    sys.unraisablehook(types.SimpleNamespace(
        exc_type=ValueError, exc_value=ValueError('tensorstore read failed'),
        exc_traceback=None, err_msg=None, object=_read_array_index_and_device_put))

    class Other:
      def __del__(self):
        raise ValueError('an unrelated unraisable error')
    Other()
    print('done')
''')


def test_verify_filters_late_orbax_read_failures_and_nothing_else(tmp_path):
  result = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path / 'missing')],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-1] == 'done'
  assert 'Event loop is closed' not in result.stderr
  assert 'tensorstore read failed' not in result.stderr
  assert 'ValueError: an unrelated unraisable error' in result.stderr
  assert f'error: {tmp_path / "missing"}' in result.stderr
