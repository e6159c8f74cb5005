"""`python -m quietstar_jax.generation`: see `quietstar_jax.generation.cli`."""

import sys

from quietstar_jax.generation.cli import main

if __name__ == "__main__":
    sys.exit(main())
