"""Subprocess worker for the two-process test: one of P CPU processes on localhost (jax.distributed + gloo), each
with its own local devices (XLA_FLAGS set by the test), feeding only its own rows [p*B/P, (p+1)*B/P) of every
global batch. Trains the standard configuration of train_helpers and writes its final trainable tree (gathered to
every host) and loss history to OUT.npz.

    python -m tests._dist_worker COORDINATOR NUM_PROCESSES PROCESS_ID WORKDIR OUT.npz
"""
import json
import sys

import jax
import numpy as np

from moa_jax import distributed
from moa_jax.config import MeshConfig
from tests.train_helpers import SyntheticSource, flat_np, no_tensorboard, run_stage, standard_setup


def main(coordinator: str, num_processes: int, process_id: int, workdir: str, out: str) -> None:
    assert distributed.initialize(coordinator, num_processes, process_id)  # before any device is touched
    no_tensorboard()
    tcfg, moa = standard_setup()
    source = SyntheticSource(batch_size=8, num_domains=moa.num_experts, process_index=jax.process_index(),
                             process_count=jax.process_count())
    final, history = run_stage(workdir, tcfg, moa, source, mesh_cfg=MeshConfig(data=-1, expert=2),
                               devices=jax.devices())
    np.savez(out, losses=np.asarray([h["loss"] for h in history]), **flat_np(final))
    print(json.dumps({"process": jax.process_index(), "devices": len(jax.devices()),
                      "local_devices": len(jax.local_devices()), "losses": [h["loss"] for h in history]}),
          flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
