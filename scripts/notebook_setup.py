"""The notebook's install step: which JAX build this runtime needs, and the scripts/setup_env.sh call for it.

    python -m scripts.notebook_setup [--accelerator auto|tpu|cuda|cpu] [--dry-run]

`accelerator()` reads the machine: a TPU shows device files /dev/accel* (TPU v2-v4) or /dev/vfio/<n> (v5e and
later), an NVIDIA GPU an `nvidia-smi` on PATH or /dev/nvidia<n>; anything else runs JAX on the CPU. The install goes
into the running Python (`--system`, PYTHON=sys.executable): on Colab that is the notebook's kernel. It installs
moa_jax with its compatible ranges (`--ranges`, setup.cfg), not requirements.txt's exact pins, so a runtime's own
jax build (Colab's) stays when it is in range.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from typing import Optional

FLAGS = {"tpu": ["--tpu"], "cuda": ["--cuda"], "cpu": []}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accelerator(dev: str = "/dev", nvidia_smi: Optional[str] = None) -> tuple[str, str]:
    """-> (kind, evidence): kind one of FLAGS; evidence the file that decided it ('' for the CPU).
    `nvidia_smi`: the path of nvidia-smi (default: looked up on PATH)."""
    tpu = sorted(glob.glob(os.path.join(dev, "accel*")) + glob.glob(os.path.join(dev, "vfio", "[0-9]*")))
    if tpu:
        return "tpu", tpu[0]
    smi = nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi")
    gpu = ([smi] if smi else []) + sorted(glob.glob(os.path.join(dev, "nvidia[0-9]*")))
    if gpu:
        return "cuda", gpu[0]
    return "cpu", ""


def setup_command(kind: str, dry_run: bool = False) -> list[str]:
    """The scripts/setup_env.sh call that installs moa_jax for `kind` into the running Python."""
    return ["bash", os.path.join(ROOT, "scripts", "setup_env.sh"), "--system", "--ranges", *FLAGS[kind]] + \
        (["--dry-run"] if dry_run else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.notebook_setup", description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=("auto", *FLAGS), default="auto",
                        help="auto (default): read it from the machine; or force one")
    parser.add_argument("--dry-run", action="store_true", help="print setup_env.sh's commands, install nothing")
    args = parser.parse_args(argv)
    kind, evidence = accelerator() if args.accelerator == "auto" else (args.accelerator, "--accelerator")
    cmd = setup_command(kind, args.dry_run)
    extra = {"tpu": "jax[tpu]", "cuda": "jax[cuda12]", "cpu": "JAX for the CPU"}[kind]
    print(f"runtime: {kind}{f' ({evidence})' if evidence else ''} -> installing moa_jax with its compatible ranges "
          f"and {extra} (what the runtime has in range stays): {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, env={**os.environ, "PYTHON": sys.executable}).returncode


if __name__ == "__main__":
    sys.exit(main())
