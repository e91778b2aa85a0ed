"""python -m moa_jax.generate --workdir RUN --prompt "..."  (moa_jax/cli/generate.py)."""
import sys

from moa_jax.cli.generate import main

sys.exit(main())
