"""Command lines on top of the library: `python -m moa_jax.cli.generate` (generate.py). The experiment runner is
`python -m experiments.run`; the data inspector `python -m moa_jax.data.inspect`."""
