"""The capacity workflow, "When does MoA beat one LoRA?": the same data, budget and test items for four arms,

    moa_router         MoA at moa.rank R (the main run: loaded from reuse_from when its stages match)
    moa_router[rR']    MoA at the small rank R' = capacity.rank (its own stage 1 + stage 2)
    mixed_lora[rR']    one LoRA on all domains at rank R' (where one LoRA must compromise)
    mixed_lora[rE*R']  one LoRA at rank E x R': as many LoRA parameters as the E experts of MoA at rank R'

and a capacity table (results.md "Capacity", results.json "capacity"): per arm its rank, trainable parameters,
inference FLOPs per token, PPL, accuracy and routing accuracy.

    python -m experiments.run --exp=moa_10task_capacity [--set reuse_from=runs/moa_10task]

How: the base model is loaded and the data tokenised once; each arm is that experiment with its rank (alpha scaled
with it, so alpha / rank stays the main run's) and its one evaluated method, trained by two_stage.train_all in its
own directory (the main arm in the work directory itself, the others in arms/<NAME>/), so an interrupted study
resumes per stage. All arms are evaluated in one pass on the same items (eval.ppl_items_per_domain for PPL).
Trainable parameters: every lora_a / lora_b entry, plus the routers for MoA (the mixed LoRA is run with forced
routing, so its 1-output router is neither trained nor counted). Inference FLOPs per token: the analytic forward
of moa_jax/flops.py (matmuls) at a context of data.max_len slots: the base + ONE adapter of rank R (top-1 MoA
runs one expert per sequence, the mixed LoRA its one adapter); the routers' per-prompt decision is left out.
Ablation variants are not part of the study (the arms set variants=()).

Shape glossary: E experts (= domains), R rank, L layers, D width, S kv slots.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import numpy as np
from flax import traverse_util

from moa_jax.flops import forward_flops
from moa_jax.config import ExperimentConfig, ModelConfig, replace
from moa_jax.eval.evaluate import Method
from moa_jax.workflows.sections import CapacityConfig
from moa_jax.workflows.context import prepare
from moa_jax.workflows.two_stage import train_all
from moa_jax.methods import METHODS

log = logging.getLogger("moa_jax")
LORA_LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: `method` (moa_router | mixed_lora) at `rank`, trained by `exp` in workdir/`subdir`."""
    name: str
    method: str
    rank: int
    exp: ExperimentConfig
    label: str      # its name in the results (the main arm: the plain method name)
    subdir: str     # "" = the work directory itself (the main arm)


def plan_arms(exp: ExperimentConfig, study: CapacityConfig) -> list[Arm]:
    """The study's arms (module docstring), main arm first; an arm equal to an earlier one is left out."""
    main, small, experts = exp.moa.rank, study.rank, exp.moa.num_experts
    wanted = [("moa_router", main), ("moa_router", small), ("mixed_lora", small), ("mixed_lora", experts * small)]
    arms, seen = [], set()
    for method, rank in wanted:
        if (method, rank) in seen:
            continue
        seen.add((method, rank))
        is_main = not arms
        name = f"{'moa' if method == 'moa_router' else 'mixed'}_r{rank}"
        moa = replace(exp.moa, rank=rank, alpha=exp.moa.alpha * rank / main)
        arm_exp = replace(exp, moa=moa, eval=replace(exp.eval, methods=(method,)), variants=(),
                          reuse_from=exp.reuse_from if is_main else "")
        arms.append(Arm(name, method, rank, arm_exp, method if is_main else f"{method}[r{rank}]",
                        "" if is_main else os.path.join("arms", name)))
    return arms


def adapter_params(tree, with_router: bool) -> int:
    """Trainable entries of an adapter tree: every lora_a / lora_b leaf, and the router leaves when `with_router`."""
    flat = traverse_util.flatten_dict(jax.device_get(tree))
    return int(sum(np.size(v) for k, v in flat.items()
                   if k[-1] in LORA_LEAVES or (with_router and any("router" in str(p) for p in k))))


def inference_flops(cfg: ModelConfig, exp: ExperimentConfig, rank: int) -> float:
    """Forward FLOPs of one token at a context of data.max_len slots with one rank-`rank` adapter (0: the base)."""
    return forward_flops(cfg, 1, exp.data.max_len, rank, exp.moa.targets, experts_computed=1)


def capacity_rows(results: dict, arms: list[Arm], params: dict, cfg: ModelConfig, exp: ExperimentConfig) -> list:
    rows, base = [], inference_flops(cfg, exp, 0)
    for arm in arms:
        entry = results["methods"][arm.label]
        rows.append({"method": arm.label, "arm": arm.name, "rank": arm.rank, "trainable_params": params[arm.name],
                     "inference_flops_per_token": inference_flops(cfg, exp, arm.rank),
                     "adapter_flops_per_token": inference_flops(cfg, exp, arm.rank) - base,
                     "ppl": entry["mean_ppl"], "accuracy": entry["mean_accuracy"],
                     "routing_accuracy": entry.get("mean_routing_accuracy")})
    return rows


def capacity_markdown(section: dict) -> str:
    f = lambda x, fmt="{:.3f}": "-" if x is None else fmt.format(x)   # noqa: E731
    lines = ["", "## Capacity: when does MoA beat one LoRA?", "",
             f"Base model forward without adapters: {section['base_flops_per_token'] / 1e6:.2f} MFLOPs per token "
             f"(context {section['context']} slots). PPL over {section['ppl_items']} test items per domain, accuracy "
             f"over {section['accuracy_items']}; averages over domains.", "",
             "| method | rank | trainable params | inference MFLOPs / token | of which adapter | PPL | accuracy | "
             "routing accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        lines.append(f"| {r['method']} | {r['rank']} | {r['trainable_params']:,} | "
                     f"{r['inference_flops_per_token'] / 1e6:.2f} | {r['adapter_flops_per_token'] / 1e6:.3f} | "
                     f"{f(r['ppl'])} | {f(r['accuracy'])} | {f(r['routing_accuracy'])} |")
    lines += ["", f"How: {section['how']}", ""]
    return "\n".join(lines)


def _span(counts) -> str:
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def run_capacity(exp: ExperimentConfig, study: CapacityConfig, workdir: str, progress: bool = True) -> dict:
    """The whole study (module docstring); writes results.json / results.md into `workdir`, returns the results."""
    from moa_jax.eval.report import write_report
    t0 = time.perf_counter()
    if exp.variants:
        log.info("capacity study: the ablation variants %s are not run", [v.split(":")[0] for v in exp.variants])
    ctx = prepare(replace(exp, variants=()), workdir, workflow="capacity", section=study)
    arms = plan_arms(ctx.exp, study)   # with moa.num_experts from the data (the parameter-matched rank needs it)
    trained, specs, params, stages = {}, [], {}, {}
    for arm in arms:
        arm_ctx = dataclasses.replace(ctx, exp=arm.exp, workdir=os.path.join(workdir, arm.subdir), stage_dirs={})
        log.info("== capacity arm %s: %s at rank %d", arm.name, arm.method, arm.rank)
        out = train_all(arm_ctx, progress)
        key = METHODS[arm.method].trained
        moa, tree = out[key]
        trained[f"{key}[{arm.name}]"] = (moa, tree)
        params[arm.name] = adapter_params(tree, with_router=arm.method == "moa_router")
        specs.append(Method(arm.method, moa, label=arm.label, key=f"{key}[{arm.name}]"))
        stages.update({os.path.join(arm.subdir, k): v for k, v in arm_ctx.stage_dirs.items()})
    results = ctx.evaluate(trained, specs, progress)
    ctx.close()   # the W&B run, if any
    section = {"arms": {a.name: {"method": a.method, "rank": a.rank, "alpha": a.exp.moa.alpha,
                                 "directory": os.path.join(workdir, a.subdir)} for a in arms},
               "rows": capacity_rows(results, arms, params, ctx.cfg, exp),
               "base_flops_per_token": inference_flops(ctx.cfg, exp, 0),
               "context": exp.data.max_len,
               "ppl_items": _span(results.get("ppl_items_per_domain", results["items_per_domain"])),
               "accuracy_items": _span(results["items_per_domain"]),
               "how": "trainable params = every lora_a/lora_b entry (+ the routers for MoA); inference FLOPs = the "
                      "analytic matmul forward of one token (moa_jax/flops.py) with ONE adapter of the arm's "
                      "rank (top-1 MoA runs one expert per sequence), the routers' per-prompt decision left out; "
                      "alpha scaled with the rank (alpha / rank as the main run's)."}
    results.update(experiment=exp.name, model=exp.model, runtime_seconds=time.perf_counter() - t0,
                   backend=jax.default_backend(), stages=stages, capacity=section,
                   steps={"stage1": exp.stage1.steps, "stage2": exp.stage2.steps, "batch_size": exp.data.batch_size})
    if jax.process_index() == 0:
        write_report(results, workdir)
        with open(os.path.join(workdir, "results.md"), "a") as f:
            f.write(capacity_markdown(section))
        log.info("capacity table:%s", capacity_markdown(section))
    return results

