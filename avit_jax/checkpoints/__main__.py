"""python -m avit_jax.checkpoints verify DIR"""

import sys

from avit_jax import command_line

command_line.quiet_libraries()  # before orbax loads TensorFlow

from avit_jax.checkpoints.verify import main  # pylint: disable=wrong-import-position

sys.exit(main())
