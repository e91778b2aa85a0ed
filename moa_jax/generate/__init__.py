"""Routed batched decoding (decode.py), the next-token choice: greedy, temperature, top-k, nucleus (sampling.py),
and a decode streamed as text pieces (stream.py); `python -m moa_jax.cli.generate` runs the generation command
line (moa_jax/cli/generate.py)."""
