"""Routed batched decoding (decode.py); `python -m moa_jax.cli.generate` runs the generation command line
(moa_jax/cli/generate.py)."""
