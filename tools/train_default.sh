#!/usr/bin/env bash
# Trains A-ViT on the embedded Fashion-MNIST default (configs/fashion_mnist.py) into
# WORKDIR (default workdirs/fashion_mnist). Extra arguments go to avit_jax.main.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
WORKDIR=${WORKDIR:-workdirs/fashion_mnist}
exec .venv/bin/python -m avit_jax.main --config configs/fashion_mnist.py --workdir "$WORKDIR" "$@"
