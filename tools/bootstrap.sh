#!/usr/bin/env bash
# Sets up what the project needs on a fresh Debian machine: the Fashion-MNIST IDX files
# (Debian package) and a virtual environment .venv with pinned versions. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  echo "bootstrap: installing Debian's dataset-fashion-mnist into $FMNIST_DIR" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# Reinstalled when the pins or the package layout change: an editable install made for
# another layout may not find new subpackages outside the repository root.
STAMP=.venv/.installed-$( (cat setup.py constraints.txt; find avit_jax -name __init__.py | sort) \
  | sha1sum | cut -c1-12)
if [ ! -f "$STAMP" ]; then
  echo "bootstrap: creating .venv and installing avit_jax[test] (pinned by constraints.txt)" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # torch first and alone, at its pinned version, so the packages after it find it installed.
  .venv/bin/pip install -q -c constraints.txt torch==2.13.0
  .venv/bin/pip install -q -c constraints.txt -e '.[test]'
  rm -f .venv/.installed-*
  touch "$STAMP"
fi
