"""The moa_jax performance suite (targets and method: BENCHMARKS.md):
`python -m benchmarks.run --suite cpu|gpu|smoke|smollm2`.

Importing the package sets OMP_WAIT_POLICY=PASSIVE (unless set) BEFORE anything loads torch: OpenMP threads
that spin while waiting (the default) collapse on a shared, oversubscribed machine. Measured on the 2-core box
under load ~6: PEFT's mixed-adapter forward took 12-15 s per call instead of 0.26 s, varying 25x between rounds.
Passive waiting is torch at its best there, and the JAX side does not use OpenMP. It also turns GPU memory
preallocation off (XLA_PYTHON_CLIENT_PREALLOCATE=false), so that `memory_stats()` peaks mean something.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
