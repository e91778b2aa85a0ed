"""The two_stage workflow, one MoA experiment end to end: base model + data -> stage 1 -> stage 2 -> baselines ->
ablation variants -> evaluation -> report.

    workdir/config.json                  the resolved ExperimentConfig
    workdir/stage1/  stage2/  mixed_lora/  moe_lora/    each: checkpoints/, adapters/, metrics.jsonl, tensorboard/,
                                         and with eval_every best_adapters/ (lowest validation loss)
    workdir/variants/<NAME>/stage2/ (or moe_lora/)      one ablation variant (ExperimentConfig.variants)
    workdir/arms/<NAME>/stage1/ ...       one arm of the capacity study (moa_jax/workflows/capacity.py)
    workdir/results.json  results.md  *.png            the report (moa_jax/eval/report.py)
    workdir/eval/tensorboard/            the evaluation's averages per method, at stage 2's last step

Every stage resumes from its own checkpoints, so re-running the same command after an interruption continues
where it stopped and a finished stage is not trained again. Restore order per stage: its own checkpoint > the
previous stage's adapters (stage 2 <- stage 1) > fresh experts on the frozen base.

How ablation variants share work: a variant may only change what comes after stage 1 (stage-2 and MoE-LoRA
settings, the decision policy), so all variants start from the experiment's one stage 1; a variant whose
training settings equal the main run's (or an earlier variant's) reuses those trained adapters instead of
training again (e.g. `moa.decision=vote` only re-evaluates). `reuse_from=<workdir of an earlier run>` goes one
step further: any top-level stage whose resolved config equals the one there is loaded from there (stage 1 must
match), so the ablations can start from the main experiment's stage 1 and stage 2. Training a stage, resuming it,
reusing it and fitting its routers are the shared stage machinery of moa_jax/workflows/context.py.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
from flax import traverse_util

from moa_jax.config import ROUTING_DECISION_FIELDS, ConfigError, ExperimentConfig, MoAConfig, TrainConfig, replace
from moa_jax.data.prompt_format import resolve_prompt_format
from moa_jax.data.sources import resolve_system_prompt
from moa_jax.eval.calibration import routing_study, write_routing_file
from moa_jax.eval.evaluate import Method
from moa_jax.methods import METHODS
from moa_jax.params import init_trainable, merge_params
from moa_jax.peft_import import experts_for_domains, parse_adapter_specs
from moa_jax.routing import AUTO, resolve
from moa_jax.run_artifacts import CONFIG_FILE, RunArtifactError, read_json
from moa_jax.train.checkpoint import BEST_ADAPTERS, load_adapters, read_best
from moa_jax.train.metrics_log import log_eval_scalars
from moa_jax.variants import Variant, parse_variant
from moa_jax.workflows.context import ExperimentContext, fit_stage_routers, prepare

log = logging.getLogger("moa_jax")
class _Concat:
    """Micro-batch stream that replays stage 1's batches, then stage 2's (the mixed-LoRA baseline sees the same
    examples as MoA)."""

    def __init__(self, first, first_len: int, second):
        self.first, self.first_len, self.second = first, first_len, second

    def batch(self, index: int) -> dict:
        return self.first.batch(index) if index < self.first_len else self.second.batch(index - self.first_len)


def train_all(ctx: ExperimentContext, progress: bool = True) -> dict[str, tuple[MoAConfig, Any]]:
    """Stage 1, stage 2 and the baselines the evaluation asks for. -> {name: (MoAConfig, trainable tree)}."""
    exp, moa = ctx.exp, ctx.exp.moa
    needed = {METHODS[m].trained for m in exp.eval.methods}   # the adapters the evaluated methods use
    src1 = ctx.source(0, exp.stage1.grad_accum)
    out: dict[str, tuple[MoAConfig, Any]] = {}
    # MoA's stages, unless only the mixed LoRA (or no adapters) is evaluated: variants build on stage 1 too
    if needed & {"single_lora", "moa", "moe_lora"} or exp.variants:
        stage1 = stage1_experts(ctx, src1, progress)
        out["single_lora"] = (moa, stage1)
        out["moa"] = train_stage2(ctx, exp, stage1, progress)
    if "mixed_lora" in needed:
        moa1 = replace(moa, num_experts=1)
        first = exp.stage1.steps * exp.stage1.grad_accum
        total = first + exp.stage2.steps * exp.stage2.grad_accum
        tcfg = exp.baseline
        if tcfg.steps == 0:  # same examples as stage 1 + stage 2
            tcfg = replace(tcfg, steps=total // tcfg.grad_accum)
        src2 = ctx.source(1, exp.stage2.grad_accum)
        mixed, _ = ctx.train("mixed_lora", moa1, tcfg, init_trainable(ctx.cfg, moa1, jax.random.fold_in(_key(exp), 3)),
                             _Concat(src1, first, src2), progress)
        out["mixed_lora"] = (moa1, mixed)
    if "moe_lora" in needed:
        out["moe_lora"] = train_moe_lora(ctx, exp, stage1, progress)
    return out


def stage1_experts(ctx: ExperimentContext, source, progress: bool):
    """Stage 1: trained here, or the PEFT adapters of stage1.init_from_peft (routers stay fresh)."""
    exp = ctx.exp
    init = init_trainable(ctx.cfg, exp.moa, _key(exp))
    if not exp.stage1.init_from_peft:
        return ctx.train("stage1", exp.moa, exp.stage1, init, source, progress)[0]
    flat = traverse_util.flatten_dict(jax.device_get(init))
    flat.update(experts_for_domains(exp.stage1.init_from_peft, ctx.domains, ctx.cfg, exp.moa))
    log.info("== stage1: %d experts imported from PEFT adapters (not trained): %s", exp.moa.num_experts,
             ", ".join(exp.stage1.init_from_peft))
    return traverse_util.unflatten_dict(flat)


def _key(exp: ExperimentConfig) -> jax.Array:
    return jax.random.PRNGKey(exp.stage1.seed)


def train_stage2(ctx: ExperimentContext, exp: ExperimentConfig, stage1: Any, progress: bool, subdir: str = ""):
    """Stage 2 (experts from stage 1, or fresh with stage2.expert_init=random), then with stage2.router_fit_prompts
    the routers fitted to convergence -> (MoAConfig, trainable)."""
    init = stage1 if exp.stage2.expert_init == "stage1" else init_trainable(ctx.cfg, exp.moa,
                                                                             jax.random.fold_in(_key(exp), 2))
    trained, _ = ctx.train("stage2", exp.moa, exp.stage2, init, ctx.source(1, exp.stage2.grad_accum), progress,
                           subdir)
    label = os.path.join(subdir, "stage2")
    adapters = os.path.join(ctx.stage_dirs[label], "adapters")
    if not exp.stage2.router_fit_prompts:
        return exp.moa, trained
    if ctx.stage_dirs[label] == os.path.join(ctx.workdir, label):
        trained, ctx.router_fits[label] = fit_stage_routers(ctx, exp.moa, trained, 0, exp.stage2.router_fit_prompts,
                                                            adapters)
    else:   # reused from another run, which fitted it under the same config
        ctx.router_fits[label] = read_json(os.path.join(adapters, CONFIG_FILE))["router_fit"]
    return exp.moa, trained


def _moe_setup(exp: ExperimentConfig) -> tuple[MoAConfig, TrainConfig]:
    tcfg = exp.moe_lora if exp.moe_lora.steps else replace(exp.moe_lora, steps=exp.stage2.steps)
    return replace(exp.moa, dispatch="token_topk", decision="last", route_on="adapted", exit_layer=0,
                   abstain_below=0.0), tcfg


def train_moe_lora(ctx: ExperimentContext, exp: ExperimentConfig, stage1: Any, progress: bool, subdir: str = ""):
    """The token-level MoE-LoRA baseline on stage 2's data (experts from stage 1, or fresh: 'naive')."""
    moe, tcfg = _moe_setup(exp)
    init = stage1 if tcfg.expert_init == "stage1" else init_trainable(ctx.cfg, moe, jax.random.fold_in(_key(exp), 4))
    trained, _ = ctx.train("moe_lora", moe, tcfg, init, ctx.source(1, exp.stage2.grad_accum), progress, subdir)
    return moe, trained


def study_routing(ctx: ExperimentContext, trained: dict):
    """The routing study of stage 2 (moa_jax/eval/calibration.py: early exit, calibration, abstention), when MoA
    routes top-1 from the prompt and eval.routing_study is set or a routing setting is AUTO: replaces
    trained["moa"]'s MoAConfig by the one with its AUTO routing settings
    resolved, and returns the study for the report (None when there is nothing to study)."""
    if "moa" not in trained or not resolve(trained["moa"][0]).needs_routing_pass:
        return None
    exp, (moa, trainable) = ctx.exp, trained["moa"]
    if not (exp.eval.routing_study or AUTO in (moa.exit_layer, moa.temperature, moa.abstain_below)):
        return None
    t0 = time.perf_counter()
    resolved, report = routing_study(
        ctx.cfg, moa, merge_params(ctx.frozen, trainable), ctx.data, ctx.tokenizer, names=ctx.domains,
        system_prompt=resolve_system_prompt(exp.data.system_prompt, exp.data.source),
        prompt_format=resolve_prompt_format(exp.data.prompt_format, ctx.tokenizer),
        test_items=exp.eval.items_per_domain, batch_size=exp.eval.batch_size)
    trained["moa"] = (resolved, trainable)
    report["seconds"] = time.perf_counter() - t0
    log.info("routing: exit after layer %d of %d, temperature %.3g, abstain below %.3g (fall-back %s); OOD "
             "abstained %.2f", report["exit_rule"]["exit_layer"], ctx.cfg.num_layers,
             report["calibration"]["temperature"], report["abstention"]["threshold"], moa.fallback,
             report["abstention"]["out_of_domain_abstained"])
    return report


# ---- ablation variants --------------------------------------------------------------------------------------------
def plan_variants(exp: ExperimentConfig) -> list[tuple[Variant, ExperimentConfig]]:
    """Each variant with its experiment config (validated here, before anything is loaded or trained)."""
    from moa_jax.overrides import apply_overrides
    plans = []
    for spec in exp.variants:
        variant = parse_variant(spec)
        try:
            vexp = apply_overrides(replace(exp, variants=()), variant.sets)
        except ConfigError as e:
            raise ConfigError(f"variant {variant.name!r}: {e}") from None
        plans.append((variant, vexp))
    return plans


def _training_key(exp: ExperimentConfig, method: str) -> tuple:
    """What a method's training depends on beyond the shared stage 1 (equal keys -> train once)."""
    if method == "moe_lora":
        return ("moe_lora",) + _moe_setup(exp)
    inert = {f: MoAConfig.__dataclass_fields__[f].default for f in ROUTING_DECISION_FIELDS if f != "route_on"}
    return ("stage2", exp.stage2, replace(exp.moa, **inert))


def train_variants(ctx: ExperimentContext, trained: dict, plans, progress: bool = True) -> list[Method]:
    """Train what the ablation variants need (sharing where settings match) -> their method specs."""
    exp = ctx.exp
    done = {_training_key(exp, "moa_router"): "moa"}
    if "moe_lora" in trained:
        done[_training_key(exp, "moe_lora")] = "moe_lora"
    specs = []
    for variant, vexp in plans:
        for method in variant.methods:
            tkey = _training_key(vexp, method)
            if tkey not in done:
                name = f"{'moe_lora' if method == 'moe_lora' else 'moa'}[{variant.name}]"
                train = train_moe_lora if method == "moe_lora" else train_stage2
                trained[name] = train(ctx, vexp, trained["single_lora"][1], progress,
                                      subdir=os.path.join("variants", variant.name))
                done[tkey] = name
            else:
                log.info("variant %s/%s: reuses the adapters of %s", variant.name, method, done[tkey])
            moa = replace(trained[done[tkey]][0], **{f: getattr(vexp.moa, f) for f in ROUTING_DECISION_FIELDS
                                                     if f != "route_on"})
            specs.append(Method(method, moa, label=f"{method}[{variant.name}]", key=done[tkey]))
    return specs


# ---- validation during training ---------------------------------------------------------------------------------
def validation_summary(stage_dirs: dict) -> dict:
    """Stage label -> its best validation step and losses (the record in <stage>/best_adapters), for the stages
    that validated."""
    out = {}
    for label, directory in stage_dirs.items():
        best = read_best(directory)
        if best is not None:
            m = best.get("metrics", {})
            out[label] = {"best_step": best["step"], "best_loss": best["loss"], "best_lm_loss": m.get("eval/lm_loss"),
                          "best_router_acc": m.get("eval/router_acc")}
    return out


def _stage_label(key: str) -> str:
    """A `trained` key -> the stage label it was trained under: single_lora -> stage1, moa -> stage2, mixed_lora,
    moe_lora; a variant's moa[NAME] -> variants/NAME/stage2, moe_lora[NAME] -> variants/NAME/moe_lora."""
    base, _, variant = key.partition("[")
    stage = {"single_lora": "stage1", "moa": "stage2"}.get(base, base)
    return os.path.join("variants", variant.rstrip("]"), stage) if variant else stage


def best_adapters(ctx: ExperimentContext, trained: dict) -> dict:
    """`trained` with each stage's adapters replaced by its lowest-validation-loss ones (eval.adapters=best), their
    routers fitted when the stage fits its routers (stage2.router_fit_prompts). Stage-1 experts imported from PEFT
    (stage1.init_from_peft) were not trained here and stay as they are."""
    out = {}
    for key, (moa, trainable) in trained.items():
        label = _stage_label(key)
        if label not in ctx.stage_dirs:   # not trained by this run (imported)
            out[key] = (moa, trainable)
            continue
        directory = os.path.join(ctx.stage_dirs[label], BEST_ADAPTERS)
        if read_best(ctx.stage_dirs[label]) is None:
            raise RunArtifactError(f"eval.adapters='best': stage {label} has no best adapters ({directory} is "
                                   f"missing; it was trained without validation, e.g. in the run reuse_from names)")
        best, saved = load_adapters(directory)
        log.info("evaluating %s with %s (step %d)", key, directory, read_best(ctx.stage_dirs[label])["step"])
        fit_prompts = saved.get("train", {}).get("router_fit_prompts", 0)
        if fit_prompts and "router_fit" not in saved:   # the best step's SGD routers, fitted as the final ones were
            best, ctx.router_fits[label] = fit_stage_routers(ctx, moa, best, 0, fit_prompts, directory)
        out[key] = (moa, best)
    return out


def run_experiment(exp: ExperimentConfig, workdir: str, progress: bool = True) -> dict:
    """The whole experiment; writes results.json and the report (results.md, plots) and returns the results."""
    from moa_jax.eval.report import write_report
    t0 = time.perf_counter()
    plan_variants(exp)   # a bad variant fails now, not after hours of training
    parse_adapter_specs(exp.stage1.init_from_peft)   # and so does a missing adapter directory
    ctx = prepare(exp, workdir)
    try:
        exp = ctx.exp   # moa.num_experts from the data
        plans = plan_variants(exp)
        trained = train_all(ctx, progress)
        specs = [Method(m) for m in exp.eval.methods] + train_variants(ctx, trained, plans, progress)
        if exp.eval.adapters == "best":
            trained = best_adapters(ctx, trained)
        routing = study_routing(ctx, trained)   # settles stage 2's AUTO routing before evaluation routes with it
        results = ctx.evaluate(trained, specs, progress)
        if routing is not None:
            results["routing"] = routing
    finally:
        ctx.close()
    results.update(experiment=exp.name, model=exp.model, runtime_seconds=time.perf_counter() - t0,
                   backend=jax.default_backend(), stages=dict(ctx.stage_dirs),
                   variants={v.name: list(v.sets) for v, _ in plans},
                   steps={"stage1": exp.stage1.steps, "stage2": exp.stage2.steps, "batch_size": exp.data.batch_size},
                   validation=validation_summary(ctx.stage_dirs), evaluated_adapters=exp.eval.adapters,
                   router_fit=dict(ctx.router_fits))
    if jax.process_index() == 0:
        if routing is not None:
            write_routing_file(workdir, routing)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        write_report(results, workdir)
        log_eval_scalars(os.path.join(workdir, "eval"), results, step=exp.stage2.steps)
    return results
