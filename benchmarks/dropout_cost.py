"""What LoRA dropout costs a train step: the library's hashed masks against flax's nn.Dropout (threefry bits).

    python -m benchmarks.dropout_cost [--config cpu-tiny] [--rounds 14]

Builds four single-LoRA train steps with `benchmarks.programs.train_variant` and times them interleaved in one
process (A B C D A B C D ...), printing the median step time of each and its ratio to the dropout-free step:
  none            dropout 0 (the merged single-expert GEMM: the suite's `single`)
  none_unmerged   dropout 0 with the two-GEMM LoRA path that dropout forces (the floor for any dropout)
  hashed          dropout 0.05, `moa_jax.nn.lora.lora_dropout` (keyed counter hash, 16 bits per element)
  nn_dropout      dropout 0.05 with flax's nn.Dropout in its place (32 threefry bits per element)
"""
from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn

from benchmarks import programs as P
from moa_jax.nn import lora

CONFIGS = {"cpu-tiny": P.cpu_tiny, "smoke": P.smoke}


def build(bc: P.BenchConfig) -> dict:
    batches = P.make_batches(bc, 10, 4)
    variants = {"none": P.train_variant(bc, "single", "none", batches, dropout=0.0)}
    merge, hashed = lora.merge_is_cheaper, lora.lora_dropout
    try:   # the variants are traced while the module attributes are swapped
        lora.merge_is_cheaper = lambda *a, **k: False
        variants["none_unmerged"] = P.train_variant(bc, "single", "none_unmerged", batches, dropout=0.0)
        lora.merge_is_cheaper = merge
        variants["hashed"] = P.train_variant(bc, "single", "hashed", batches, dropout=0.05)
        lora.lora_dropout = lambda x, rate, rng: nn.Dropout(rate)(x, deterministic=False, rng=rng)
        variants["nn_dropout"] = P.train_variant(bc, "single", "nn_dropout", batches, dropout=0.05)
    finally:
        lora.merge_is_cheaper, lora.lora_dropout = merge, hashed
    return variants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu-tiny")
    parser.add_argument("--rounds", type=int, default=14)
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
        print(f"{k:14s} {1000 * m:8.1f} ms   / none {m / med['none']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
