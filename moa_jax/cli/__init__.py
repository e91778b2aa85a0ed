"""Command lines on top of the library: `python -m moa_jax.cli.generate` (generate.py) and the `moa-jax` console
script (main.py), whose subcommands are the command lines: train (`python -m experiments.run`), generate, and
inspect (`python -m moa_jax.data.inspect`)."""
