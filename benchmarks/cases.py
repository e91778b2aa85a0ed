"""The suites: which variants are timed together (one interleaved group per comparison), the ratios each group
reports and the project's targets for them (BENCHMARKS.md).

A group builds its variants (compiling each ahead of time), runs them interleaved for `rounds` rounds under a
`CompileCounter` (any compile in steady state fails the group's cases), and reports per-variant statistics,
compile time, FLOPs (analytic and XLA's) and memory. A `Ratio` is time(num) / time(den), or its inverse for
throughput / "x faster" rows; targets use the median of the per-round paired ratios (timing.ratio), and rows
"within 15% of the FLOP model" compare that with the analytic FLOP ratio of the same two programs.

Suites: smoke (CI, tiny shapes, 2 rounds), cpu (the target table on cpu-tiny), gpu (gpu-1b bf16, MFU),
smollm2 (the LM-head share of a SmolLM2-135M-shaped step; slow, few rounds).
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable, Optional

import jax

from benchmarks import programs as P
from benchmarks.timing import CompileCounter, Variant, device_peak_bytes, interleave, ratio, rss_mb, summarize

H100_BF16_PEAK = 989e12
SCALING_EXPERTS = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass
class Ratio:
    case: str                        # the row of the target table (or an informational row)
    num: str
    den: str
    faster: bool = False             # report time(den) / time(num): throughput or "x faster"
    op: Optional[str] = None         # "<=", ">=", "model" (within `tol` of the FLOP model) or None (info)
    target: Optional[float] = None
    tol: float = 0.15


@dataclasses.dataclass
class Group:
    name: str
    config: str
    build: Callable[[], list[Variant]]
    ratios: list[Ratio]
    rounds: int = 10


# ---------------------------------------------------------------- groups
def _peft():
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from benchmarks import peft_ref
    return peft_ref


def build_all(thunks: list) -> list[Variant]:
    """Builds (traces + compiles) the variants one at a time, so each compile_s is a compile alone. (Two at a time
    was tried: on the loaded 2-core box the train group's build took 108 s instead of 98 s.)"""
    return [thunk() for thunk in thunks]


def _names(bc: P.BenchConfig, experts: tuple) -> tuple[str, str, str]:
    """Variant names of the single LoRA (top-1 at E=1), MoA top-1 and soft at the config's E."""
    return "top1_E1", f"top1_E{bc.experts}", f"soft_E{bc.experts}"


def _expert_list(bc: P.BenchConfig, experts: tuple) -> list[int]:
    return sorted(set(experts) | {1, bc.experts})


def _scaling_ratios(mode: str, experts: list[int], soft: list[int]) -> list[Ratio]:
    """top-1 and soft at each E against E=1 of the same dispatch, vs the FLOP model."""
    e0, e1 = experts[0], experts[-1]
    out = [Ratio(f"top-1 {mode} time at E={e1} / at E={e0}", f"top1_E{e1}", f"top1_E{e0}", op="<=", target=1.05)]
    if len(experts) > 2:
        out.append(Ratio(f"top-1 {mode} time at E={e1} / at E={experts[1]} (both on the gather path)",
                         f"top1_E{e1}", f"top1_E{experts[1]}", op="<=", target=1.05))
    out += [Ratio(f"top-1 {mode} time at E={e} / at E={e0}", f"top1_E{e}", f"top1_E{e0}", op="model")
            for e in experts[1:-1]]
    out += [Ratio(f"soft {mode} time at E={e} / at E={soft[0]}", f"soft_E{e}", f"soft_E{soft[0]}", op="model")
            for e in soft[1:]]
    return out


def train_group(bc: P.BenchConfig, experts: tuple, soft_experts: tuple, peft: bool, dropout_variant: bool,
                rounds: int, frozen: bool = True) -> Group:
    """Train steps: frozen fwd+bwd, top-1 at every E (E=1 = the single LoRA), soft at every E, PEFT."""
    single, top1, soft = _names(bc, experts)
    es, ss = _expert_list(bc, experts), sorted(set(soft_experts))

    def build():
        bs = P.make_batches(bc, max(es), 4)
        P.base_params(bc.model)
        thunks = [lambda: P.train_variant(bc, "frozen", "frozen", bs)] if frozen else []
        thunks += [lambda e=e: P.train_variant(bc, "top1", f"top1_E{e}", bs, experts=e) for e in es]
        thunks += [lambda e=e: P.train_variant(bc, "soft", f"soft_E{e}", bs, experts=e) for e in ss]
        if dropout_variant:
            thunks.append(lambda: P.train_variant(bc, "single", "single_dropout", bs, dropout=0.05))
        vs = build_all(thunks)
        if peft:
            R, moa = _peft(), P.moa_config(bc, "top1")
            fz, tr = P.base_params(bc.model), P.adapter_params(bc, moa)
            pb = P.for_experts(bs, bc.experts)
            vs += [R.frozen_variant("peft_frozen", bc.model, fz, pb),
                   R.single_variant("peft_single", bc.model, fz, moa, tr, pb),
                   R.mixed_loop_variant("peft_mixed_loop", bc.model, fz, moa, tr, pb)]
        return vs
    ratios = []
    if frozen:
        ratios.append(Ratio("single-LoRA train step / frozen fwd+bwd", single, "frozen", op="<=", target=1.10))
    ratios.append(Ratio(f"MoA top-1 train step (E={bc.experts}, mixed domains) / single-LoRA step", top1, single,
                        op="<=", target=1.05))
    if soft in [f"soft_E{e}" for e in ss]:
        ratios.append(Ratio(f"MoA soft train step (E={bc.experts}) / single-LoRA step", soft, single, op="model"))
    if frozen:
        ratios.append(Ratio(f"MoA top-1 train step (E={bc.experts}) / frozen fwd+bwd", top1, "frozen"))
    if dropout_variant:
        ratios.append(Ratio("single-LoRA step with dropout 0.05 / without", "single_dropout", single))
    if peft:
        ratios += [Ratio("ours vs PEFT, mixed-domain training (PEFT loops over experts), x faster",
                         top1, "peft_mixed_loop", faster=True, op=">=", target=1.25),
                   Ratio("ours vs PEFT, single-LoRA training step, x faster", single, "peft_single", faster=True,
                         op=">=", target=1.0),
                   Ratio("ours vs PEFT, frozen fwd+bwd, x faster", "frozen", "peft_frozen", faster=True),
                   Ratio("PEFT single-LoRA step / PEFT frozen fwd+bwd", "peft_single", "peft_frozen")]
    ratios += _scaling_ratios("train", es, ss)
    return Group("train", bc.name, build, ratios, rounds)


def infer_group(bc: P.BenchConfig, experts: tuple, soft_experts: tuple, peft: bool, rounds: int) -> Group:
    """Forward logits: frozen, top-1 at every E (E=1 = single LoRA), soft at every E, PEFT (+ logits parity)."""
    single, top1, soft = _names(bc, experts)
    es, ss = _expert_list(bc, experts), sorted(set(soft_experts))

    def build():
        bs = P.make_batches(bc, max(es), 4)
        P.base_params(bc.model)
        thunks = [lambda: P.infer_variant(bc, "frozen", "frozen", bs)]
        thunks += [lambda e=e: P.infer_variant(bc, "top1", f"top1_E{e}", bs, experts=e) for e in es]
        thunks += [lambda e=e: P.infer_variant(bc, "soft", f"soft_E{e}", bs, experts=e) for e in ss]
        vs = build_all(thunks)
        if peft:
            R, moa = _peft(), P.moa_config(bc, "top1")
            fz, tr = P.base_params(bc.model), P.adapter_params(bc, moa)
            pb = P.for_experts(bs, bc.experts)
            pv, parity = R.infer_variants({"base": "peft_base", "single": "peft_single", "mixed": "peft_mixed"},
                                          bc.model, fz, moa, tr, pb)
            ours = next(v for v in vs if v.name == top1)
            m = pb[0]
            logits = ours.info["jitted"](P.merge_params(fz, tr), m["tokens"][0], m["attention_mask"][0],
                                         m["prompt_mask"][0], m["domain"][0])
            ours.info["peft_parity_max_abs_logit_diff"] = parity(logits)
            vs += pv
        return vs
    ratios = [Ratio("MoA top-1 mixed-domain inference / single-LoRA inference (throughput)", top1, single,
                    faster=True, op=">=", target=0.95),
              Ratio("MoA top-1 mixed inference / frozen base inference (throughput)", top1, "frozen",
                    faster=True, op=">=", target=0.93),
              Ratio("single-LoRA inference / frozen base inference (throughput)", single, "frozen", faster=True)]
    if soft in [f"soft_E{e}" for e in ss]:
        ratios.append(Ratio(f"MoA soft inference (E={bc.experts}) / single-LoRA inference (time)", soft, single,
                            op="model"))
    if peft:
        ratios += [Ratio("ours vs PEFT, mixed-domain inference (PEFT adapter_names), x faster", top1,
                         "peft_mixed", faster=True, op=">=", target=1.3),
                   Ratio("ours vs PEFT, single-LoRA inference, x faster", single, "peft_single", faster=True),
                   Ratio("ours vs PEFT (torch), frozen base inference, x faster", "frozen", "peft_base",
                         faster=True)]
    ratios += _scaling_ratios("infer", es, ss)
    return Group("inference", bc.name, build, ratios, rounds)


def decode_group(bc: P.BenchConfig, rounds: int) -> Group:
    def build():
        P.base_params(bc.model)
        return build_all([lambda k=k: P.decode_variant(bc, k, k) for k in ("frozen", "single", "top1")])
    ratios = [Ratio(f"KV-cache decode, mixed E={bc.experts} / single LoRA tokens/s", "top1", "single", faster=True,
                    op=">=", target=0.90),
              Ratio("KV-cache decode, single LoRA / frozen base tokens/s", "single", "frozen", faster=True)]
    return Group("decode", bc.name, build, ratios, rounds)


def recompile_check(bc: P.BenchConfig, steps: int, batch: int) -> dict:
    """The top-1 train step jitted once, then `steps` calls with `steps` different domain mixes: the jit cache
    must not grow and nothing may compile."""
    bs = P.make_batches(bc, bc.experts, steps, seed=7, batch=batch)
    small = dataclasses.replace(bc, batch=batch)
    v = P.train_variant(small, "top1", "top1_recompile", bs)
    jitted = v.info["jitted"]
    with CompileCounter() as cc:
        t0 = time.perf_counter()
        for _ in range(steps):
            v.run()
        wall = time.perf_counter() - t0
    return {"steps": steps, "batch": batch, "compiles_in_steady_state": cc.count(),
            "jit_cache_size": jitted._cache_size(), "compile_s": v.compile_s, "steps_wall_s": wall,
            "domain_mixes": len({tuple(map(int, b["domain"][0])) for b in bs}), "pass": cc.count() == 0}


def head_group(bc: P.BenchConfig, rounds: int) -> Group:
    """The LM head + log-softmax share of a single-LoRA step: the library step vs the same step with the head
    against only the first 128 vocabulary rows (everything else identical)."""
    def build():
        bs = P.make_batches(bc, 1, 2)
        return [P.train_variant(bc, "single", "single", bs), P.small_head_train_variant(bc, "single_head128", bs)]
    return Group("lm_head", bc.name, build, [Ratio("single-LoRA step with a 128-row head / full head",
                                                   "single_head128", "single")], rounds)


REMAT_POLICIES = ("projections", "full", "none")


def remat_group(bc: P.BenchConfig, rounds: int) -> Group:
    """The MoA top-1 train step under each ModelConfig.remat policy (model.py REMAT POLICIES), side by side."""
    def build():
        bs = P.make_batches(bc, bc.experts, 4)
        with_remat = lambda r: dataclasses.replace(bc, model=dataclasses.replace(bc.model, remat=r))
        return build_all([lambda r=r: P.train_variant(with_remat(r), "top1", f"remat_{r}", bs)
                          for r in REMAT_POLICIES])
    return Group("remat", bc.name, build, [
        Ratio("top-1 train step, remat=full / remat=projections", "remat_full", "remat_projections"),
        Ratio("top-1 train step, remat=none / remat=projections", "remat_none", "remat_projections")], rounds)


# ---------------------------------------------------------------- suites
def suite_groups(suite: str, rounds: Optional[int] = None) -> tuple[list[Group], dict]:
    """-> (groups, extras). Scaling in E lives inside the train and inference groups (E=1 is the single LoRA)."""
    if suite == "smoke":  # CI: three train steps, guards only
        bc = P.smoke()
        return [train_group(bc, (1, 32), (), False, False, rounds or 2, frozen=False)], {}
    if suite == "cpu":
        bc, r = P.cpu_tiny(), rounds or 10
        return ([train_group(bc, SCALING_EXPERTS, SCALING_EXPERTS + (bc.experts,), True, True, r),
                 infer_group(bc, SCALING_EXPERTS, SCALING_EXPERTS + (bc.experts,), True, r), decode_group(bc, r),
                 remat_group(bc, r)], {"recompile": (bc, 50, 4)})
    if suite == "gpu":
        bc, r = P.gpu_1b(), rounds or 10
        return ([train_group(bc, (1, 8, 32), (bc.experts, 32), False, False, r),
                 infer_group(bc, (1, 8, 32), (bc.experts, 32), False, r), decode_group(bc, r),
                 remat_group(bc, r)], {"recompile": (bc, 50, bc.batch), "mfu": True})
    if suite == "smollm2":
        return [head_group(P.smollm2(), rounds or 3)], {}
    raise ValueError(f"unknown suite {suite!r}; valid: smoke, cpu, gpu, smollm2")


def run_group(g: Group, log=print) -> dict:
    t0 = time.perf_counter()
    variants = g.build()
    build_s = time.perf_counter() - t0
    log(f"[{g.name}] built {len(variants)} variants in {build_s:.1f} s; {g.rounds} interleaved rounds ...")
    with CompileCounter() as cc:
        times, cpu = interleave(variants, g.rounds)
    vout = {}
    for v in variants:
        info = {k: x for k, x in v.info.items() if k not in ("jitted", "compiled")}
        vout[v.name] = {**summarize(times[v.name]), "cpu_median_s": summarize(cpu[v.name])["median_s"],
                        "compile_s": v.compile_s, **info, "times_s": times[v.name], "cpu_s": cpu[v.name]}
    rows = [evaluate_ratio(r, times, vout, cpu) for r in g.ratios]
    out = {"config": g.config, "build_s": build_s, "run_s": time.perf_counter() - t0 - build_s,
           "compiles_in_steady_state": cc.count(), "compiled_names": sorted(set(cc.names)),
           "rss": rss_mb(), "device_peak_bytes": device_peak_bytes(), "variants": vout, "ratios": rows}
    if cc.count():  # a recompile in steady state invalidates every case of the group
        for row in rows:
            row["pass"] = False if row["pass"] is not None else None
            row["note"] = f"{cc.count()} compiles in steady state"
    log(f"[{g.name}] done in {out['run_s']:.1f} s; compiles in steady state: {cc.count()}")
    return out


def evaluate_ratio(r: Ratio, times: dict, variants: dict, cpu: dict) -> dict:
    rt = ratio(times, r.num, r.den)
    value = {k: (1.0 / x if r.faster else x) for k, x in rt.items()}
    cpu_paired = ratio(cpu, r.num, r.den)["paired"]
    cpu_paired = 1.0 / cpu_paired if r.faster else cpu_paired
    fa, fb = variants[r.num].get("flops_analytic"), variants[r.den].get("flops_analytic")
    model = (fb / fa if r.faster else fa / fb) if fa and fb else None
    ok = None
    v = value["paired"]
    if r.op == "<=":
        ok = v <= r.target
    elif r.op == ">=":
        ok = v >= r.target
    elif r.op == "model" and model:
        ok = abs(v / model - 1.0) <= r.tol
    target = {"<=": f"<= {r.target}", ">=": f">= {r.target}", "model": f"model +-{r.tol:.0%}"}.get(r.op, "info")
    return {"case": r.case, "num": r.num, "den": r.den, "faster": r.faster, "value": v, "min_ratio": value["min"],
            "median_ratio": value["median"], "cpu_ratio": cpu_paired, "flop_model": model, "target": target, "pass": ok, "note": ""}


def run_suite(suite: str, rounds: Optional[int] = None, only: Optional[list[str]] = None, log=print) -> dict:
    groups, extra = suite_groups(suite, rounds)
    t0 = time.perf_counter()
    out = {"suite": suite, "groups": {}}
    for g in groups:
        if only and g.name not in only:
            continue
        out["groups"][g.name] = run_group(g, log)
    if "recompile" in extra and (not only or "recompile" in only):
        bc, steps, batch = extra["recompile"]
        out["recompile"] = recompile_check(bc, steps, batch)
        log(f"[recompile] {out['recompile']}")
    if extra.get("mfu") and "train" in out["groups"]:
        fz = out["groups"]["train"]["variants"]["frozen"]
        out["mfu_frozen_fwd_bwd"] = fz["flops_analytic"] / fz["median_s"] / H100_BF16_PEAK
    out["total_s"] = time.perf_counter() - t0
    out["backend"] = jax.default_backend()
    return out
