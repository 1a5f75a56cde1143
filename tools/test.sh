#!/usr/bin/env bash
# Runs the whole test suite (slow tests included) after setting up the environment.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow" -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
exec .venv/bin/python -m pytest tests "$@"
