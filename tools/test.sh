#!/usr/bin/env bash
# The test command: sets up the environment (tools/bootstrap.sh), then runs pytest.
#
#   bash tools/test.sh          the default tier: every test but those marked `slow` (minutes)
#   bash tools/test.sh --all    every test, the long end-to-end runs (`slow`) included
#
# Other arguments go to pytest, e.g. `bash tools/test.sh -x tests/test_train.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
all=0
args=()
for arg in "$@"; do
  if [ "$arg" = --all ]; then all=1; else args+=("$arg"); fi
done
bash tools/bootstrap.sh
if [ "$all" = 1 ]; then
  exec .venv/bin/python -m pytest tests ${args[@]+"${args[@]}"}
fi
exec .venv/bin/python -m pytest tests -m 'not slow' ${args[@]+"${args[@]}"}
