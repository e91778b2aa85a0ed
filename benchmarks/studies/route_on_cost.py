"""What servable routing costs a stage-2 train step: MoAConfig.route_on='probe' adds a forward of the plain base
model (no adapters; its backward reaches only the routers) to the LM forward + backward.

    python -m benchmarks.studies.route_on_cost [--config cpu-tiny] [--rounds 10]

Builds two MoA top-1 stage-2 train steps (label routing) with `benchmarks.programs.train_variant` and times them
interleaved in one process (A B A B ...), printing the median step time of each and its ratio to 'adapted'
(wall, the per-round paired wall ratio, and process CPU time: benchmarks.timing).
"""
from __future__ import annotations

from benchmarks import programs as P
from benchmarks.timing import compare_main
from moa_jax.config import replace

CONFIGS = {"cpu-tiny": P.cpu_tiny, "smoke": P.smoke}


def build(bc: P.BenchConfig) -> dict:
    batches = P.make_batches(bc, bc.experts, 4)
    variants = {"adapted": P.train_variant(bc, "top1", "adapted", batches)}
    moa_config = P.moa_config
    try:   # the variant is traced while the module attribute is swapped
        P.moa_config = lambda *a, **k: replace(moa_config(*a, **k), route_on="probe")
        variants["base"] = P.train_variant(bc, "top1", "base", batches)
    finally:
        P.moa_config = moa_config
    return variants


def main(argv=None) -> int:
    return compare_main(argv, doc=__doc__, configs=CONFIGS, build=build, baseline="adapted", rounds=10)


if __name__ == "__main__":
    raise SystemExit(main())
