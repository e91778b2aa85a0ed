"""What servable routing costs a stage-2 train step: MoAConfig.route_on='base' adds a forward of the plain base
model (no adapters; its backward reaches only the routers) to the LM forward + backward.

    python -m benchmarks.route_on_cost [--config cpu-tiny] [--rounds 10]

Builds two MoA top-1 stage-2 train steps (label routing) with `benchmarks.programs.train_variant` and times them
interleaved in one process (A B A B ...), printing the median step time of each and its ratio to 'adapted'.
"""
from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import programs as P
from moa_jax.config import replace

CONFIGS = {"cpu-tiny": P.cpu_tiny, "smoke": P.smoke}


def build(bc: P.BenchConfig) -> dict:
    batches = P.make_batches(bc, bc.experts, 4)
    variants = {"adapted": P.train_variant(bc, "top1", "adapted", batches)}
    moa_config = P.moa_config
    try:   # the variant is traced while the module attribute is swapped
        P.moa_config = lambda *a, **k: replace(moa_config(*a, **k), route_on="base")
        variants["base"] = P.train_variant(bc, "top1", "base", batches)
    finally:
        P.moa_config = moa_config
    return variants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu-tiny")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    variants = build(CONFIGS[args.config]())
    for v in variants.values():   # warm-up
        v.run()
        v.run()
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, v in variants.items():
            t = time.perf_counter()
            v.run()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(x) for k, x in times.items()}
    for k, m in med.items():
        print(f"route_on={k:8s} {1000 * m:8.1f} ms   / adapted {m / med['adapted']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
