#!/usr/bin/env bash
# Trains A-ViT on the embedded Fashion-MNIST default (configs/fashion_mnist.py) into
# WORKDIR (default workdirs/fashion_mnist). Extra arguments go to avit_jax.main.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
WORKDIR=${WORKDIR:-workdirs/fashion_mnist}
# XLA's CPU runtime allocates a ~100 MB temporary buffer for every train step, which glibc
# maps and unmaps each time (a page fault per 4 KB page: a third of the run's CPU time in
# the kernel). One malloc arena that never returns memory to the system keeps it mapped:
# measured on a 2-core EPYC VM, 9 % more images/s and 15 % less CPU time (docs/training.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295}
exec .venv/bin/python -m avit_jax.main --config configs/fashion_mnist.py --workdir "$WORKDIR" "$@"
