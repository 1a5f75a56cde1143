#!/usr/bin/env bash
# The test command: sets up the environment (tools/bootstrap.sh), then runs pytest.
#
#   bash tools/test.sh          the default tier: every test but those marked `slow` (minutes)
#   bash tools/test.sh --all    every test, the long end-to-end runs (`slow`) included
#
# Other arguments go to pytest, e.g. `bash tools/test.sh -x tests/test_train.py`. Tests run in
# AVIT_TEST_WORKERS (default 2) pytest-xdist workers, each taking whole files (module
# fixtures are built once) in collection order, which tests/conftest.py starts with the
# longest files; `-n 0` runs them in this process, as --all does by default.
set -euo pipefail
cd "$(dirname "$0")/.."
all=0
args=()
for arg in "$@"; do
  if [ "$arg" = --all ]; then all=1; else args+=("$arg"); fi
done
bash tools/bootstrap.sh
workers=(-n "${AVIT_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)
if [ "$all" = 1 ]; then
  # One process: the long end-to-end runs each train the default model in full, and two
  # at once on a small machine have aborted inside XLA's CPU runtime.
  exec .venv/bin/python -m pytest tests -n "${AVIT_TEST_WORKERS:-0}" ${args[@]+"${args[@]}"}
fi
exec .venv/bin/python -m pytest tests -m 'not slow' "${workers[@]}" ${args[@]+"${args[@]}"}
