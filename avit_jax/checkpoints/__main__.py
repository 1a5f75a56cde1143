"""python -m avit_jax.checkpoints verify DIR"""

import sys

from avit_jax.checkpoints.verify import main

sys.exit(main())
