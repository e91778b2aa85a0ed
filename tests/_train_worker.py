"""Subprocess worker for the kill-and-resume test: trains the resume configuration of train_helpers for STEPS steps
in WORKDIR with a checkpoint every step, printing `step N` (flushed) and sleeping SLEEP seconds after each step,
so that the test can SIGKILL it mid-run.

    python -m tests._train_worker WORKDIR STEPS [SLEEP]
"""
import sys
import time

from tests.train_helpers import no_tensorboard, resume_setup, run_stage


def main(workdir: str, steps: int, sleep: float = 0.0) -> None:
    no_tensorboard()
    tcfg, moa, source = resume_setup(steps)

    def on_log(step, row):
        print(f"step {step} loss {row['loss']:.6f}", flush=True)
        time.sleep(sleep)

    run_stage(workdir, tcfg, moa, source, on_log=on_log)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
