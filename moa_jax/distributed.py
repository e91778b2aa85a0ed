"""Multi-host start-up: JAX's own multi-controller runtime (`jax.distributed.initialize`).

On TPU pod slices and SLURM/Open MPI GPU clusters JAX discovers the coordinator itself: call `initialize()` with
no arguments. Elsewhere (several CPU processes on one machine in tests, hand-launched GPU hosts) pass the
coordinator address, the process count and this process's id, or set MOA_COORDINATOR, MOA_NUM_PROCESSES and
MOA_PROCESS_ID. Each process then feeds its own rows of every batch (`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

import os
from typing import Optional

import jax

_initialized = False


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: bool = False) -> bool:
    """Start the distributed runtime once. Returns True when running with more than one process.

    auto=True calls `jax.distributed.initialize()` without arguments (TPU pods, SLURM, Open MPI).
    """
    global _initialized
    coordinator = coordinator or os.environ.get("MOA_COORDINATOR")
    num_processes = num_processes or _env_int("MOA_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("MOA_PROCESS_ID")
    if _initialized:
        return jax.process_count() > 1
    if coordinator is None and not auto:
        return False
    if coordinator is not None and (num_processes is None or process_id is None):
        raise ValueError("distributed: a coordinator address needs num_processes and process_id "
                         "(or MOA_NUM_PROCESSES and MOA_PROCESS_ID)")
    if jax.config.jax_platforms in (None, "", "cpu") and coordinator is not None:
        # CPU processes exchange collectives through gloo (no accelerator interconnect).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    _initialized = True
    return jax.process_count() > 1


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None
