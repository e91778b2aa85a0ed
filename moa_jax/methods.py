"""The evaluation methods: one record per method, the only table keyed by method name.

EvalConfig.methods and a variant's `methods=` are validated against it (moa_jax/config.py), the evaluation takes
each method's parameters and routing from it (moa_jax/eval/suite.py, moa_jax/eval/evaluate.py), and the report
describes each method with it (moa_jax/eval/report.py).

Imports only moa_jax.routing, so moa_jax.config can use it. No arrays here (no shape glossary).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moa_jax.routing import ROUTINGS


@dataclass(frozen=True)
class MethodInfo:
    """One evaluation method.

    name              the name in EvalConfig.methods and the results (an ablation variant reports `name[VARIANT]`)
    routing           how it routes (moa_jax.routing.ROUTINGS); None: no model at all (most_common)
    trained           the key of its adapters among the trained trees (moa_jax/workflows/two_stage.py `train_all`);
                      None: no adapters (the frozen base, or no model)
    routing_accuracy  the report gives its routing accuracy and confusion (its routers decide one expert per item)
    variant           an ablation variant may evaluate it (it uses what a variant retrains after stage 1)
    description       the line the report shows for it
    """
    name: str
    routing: Optional[str]
    trained: Optional[str]
    routing_accuracy: bool
    variant: bool
    description: str

    def __post_init__(self):
        assert self.routing is None or self.routing in ROUTINGS, self


METHODS = {m.name: m for m in (
    MethodInfo("most_common", None, None, False, False,
               "the domain's most common TRAIN answer for every test item (a floor; no PPL)"),
    MethodInfo("base", "base", None, False, False, "the base model, adapters off"),
    MethodInfo("single_lora", "oracle", "single_lora", False, False,
               "stage-1 experts, the domain given (paper: Single-LoRA)"),
    MethodInfo("mixed_lora", "forced", "mixed_lora", False, False,
               "one LoRA on all domains mixed, the same examples as stage 1 + stage 2 (paper: Single-LoRA (mixed))"),
    MethodInfo("moa_router", "router", "moa", True, True,
               "MoA: stage-2 experts, the routers pick one expert per prompt (paper: MoA)"),
    MethodInfo("moa_oracle", "oracle", "moa", False, True,
               "MoA's stage-2 experts with the domain given (each expert used alone after joint training)"),
    MethodInfo("moe_lora", "router", "moe_lora", False, True,
               "token-level top-k MoE-LoRA over the experts, no domain labels (paper: MoE-LoRA)"),
)}
EVAL_METHODS = tuple(METHODS)
VARIANT_METHODS = tuple(n for n, m in METHODS.items() if m.variant)
MOA = "moa_router"   # the method the report compares every other method against


def unknown_methods(names, allowed: tuple = EVAL_METHODS) -> list[str]:
    """The names in `names` that are not in `allowed` (EVAL_METHODS, or VARIANT_METHODS for a variant)."""
    return [n for n in names if n not in allowed]


def method_info(name: str) -> MethodInfo:
    """The registry record of `name`; a KeyError naming the valid methods otherwise."""
    if name not in METHODS:
        raise KeyError(f"unknown evaluation method {name!r}; valid: {EVAL_METHODS}")
    return METHODS[name]
