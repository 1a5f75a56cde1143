"""python -m avit_jax.benchmark"""

from avit_jax.benchmark.cli import main

main()
