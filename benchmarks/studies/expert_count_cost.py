"""What 52 experts cost a stage-2 train step against 10: moa_52task's step beside moa_10task's expert count.

    python -m benchmarks.studies.expert_count_cost [--config smollm2-52task] [--rounds 5]

Builds two MoA top-1 stage-2 train steps (label routing, servable routing pass: route_on='probe') with
`benchmarks.programs.train_variant`, identical but for the number of experts (and so of routers' classes), and
times them interleaved in one process (A B A B ...), printing each one's median step time and its ratio to E=10
(wall, the per-round paired wall ratio, process CPU time: benchmarks.timing).
Configs: smollm2-52task (SmolLM2-135M's shapes, random weights: batch 8 x 256 tokens, rank 16, seven projections:
moa_52task's step), cpu-tiny and smoke (small and quick).
A top-1 step gathers one expert per row, so its FLOPs do not grow with E; what grows is the adapters' optimizer
update (AdamW over E x the adapter parameters) and the routers' output width.
"""
from __future__ import annotations

import dataclasses

from benchmarks import programs as P
from benchmarks.timing import compare_main
from moa_jax.config import replace

EXPERTS = (10, 52)


def smollm2_52task() -> P.BenchConfig:
    return dataclasses.replace(P.smollm2(), name="smollm2-52task", seq=256, rank=16)


CONFIGS = {"smollm2-52task": smollm2_52task, "cpu-tiny": P.cpu_tiny, "smoke": P.smoke}


def build(bc: P.BenchConfig) -> dict:
    batches = P.make_batches(bc, max(EXPERTS), 4)
    moa_config, variants = P.moa_config, {}
    try:   # each variant is traced while the module attribute is swapped
        P.moa_config = lambda *a, **k: replace(moa_config(*a, **k), route_on="probe")
        for e in EXPERTS:
            variants[f"E{e}"] = P.train_variant(bc, "top1", f"E{e}", batches, experts=e)
    finally:
        P.moa_config = moa_config
    return variants


def main(argv=None) -> int:
    return compare_main(argv, doc=__doc__, configs=CONFIGS, build=build, baseline=f"E{EXPERTS[0]}", rounds=5)


if __name__ == "__main__":
    raise SystemExit(main())
