"""Subprocess worker for the kill-and-resume tests: trains the resume configuration of train_helpers for STEPS steps
in WORKDIR with a checkpoint every step, printing `step N` (flushed) and sleeping SLEEP seconds after each step,
so that the test can SIGKILL it mid-run. With PAUSE_STEP, the write of checkpoint PAUSE_STEP stops just before orbax
commits it (its files written into the temporary directory, not yet renamed) and prints `pausing in the write of
checkpoint PAUSE_STEP`, so that the test can SIGKILL it during a checkpoint write, deterministically.

    python -m tests._train_worker WORKDIR STEPS [SLEEP [PAUSE_STEP]]
"""
import sys
import time

from tests.train_helpers import no_tensorboard, resume_setup, run_stage


def pause_in_checkpoint_write(step: int) -> None:
    from orbax.checkpoint._src.path import atomicity
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        if self._final_path.name == str(step):   # the step directory (its items 'state' and 'meta' are done)
            print(f"pausing in the write of checkpoint {step}: {self._tmp_path}", flush=True)
            time.sleep(3600)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(workdir: str, steps: int, sleep: float = 0.0, pause_step: int = 0) -> None:
    no_tensorboard()
    if pause_step:
        pause_in_checkpoint_write(pause_step)
    tcfg, moa, source = resume_setup(steps)

    def on_log(step, row):
        print(f"step {step} loss {row['loss']:.6f}", flush=True)
        time.sleep(sleep)

    run_stage(workdir, tcfg, moa, source, on_log=on_log)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *(float(a) if i == 0 else int(a) for i, a in enumerate(sys.argv[3:])))
