"""What LoRA dropout costs a train step: the library's hashed masks against flax's nn.Dropout (threefry bits).

    python -m benchmarks.studies.dropout_cost [--config cpu-tiny] [--rounds 14]

Builds four single-LoRA train steps with `benchmarks.programs.train_variant` and times them interleaved in one
process (A B C D A B C D ...), printing the median step time of each and its ratio to the dropout-free step:
  none            dropout 0 (the merged single-expert GEMM: the suite's `single`)
  none_unmerged   dropout 0 with the two-GEMM LoRA path that dropout forces (the floor for any dropout)
  hashed          dropout 0.05, `moa_jax.nn.lora.lora_dropout` (keyed counter hash, 16 bits per element)
  nn_dropout      dropout 0.05 with flax's nn.Dropout in its place (32 threefry bits per element)
"""
from __future__ import annotations

import flax.linen as nn

from benchmarks import programs as P
from benchmarks.timing import compare_main
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
    return compare_main(argv, doc=__doc__, configs=CONFIGS, build=build, baseline="none", rounds=14)


if __name__ == "__main__":
    raise SystemExit(main())
