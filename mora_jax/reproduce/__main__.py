"""python -m mora_jax.reproduce TABLE: see mora_jax/reproduce/cli.py."""

import sys

from mora_jax.reproduce.cli import main

if __name__ == "__main__":
  sys.exit(main())
