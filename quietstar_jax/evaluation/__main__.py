"""`python -m quietstar_jax.evaluation`: see `quietstar_jax.evaluation.cli`."""

import sys

from quietstar_jax.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
