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
match), so the ablations can start from the main experiment's stage 1 and stage 2.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
import time
from typing import Any

import jax
from flax import traverse_util

from moa_jax.train.checkpoint import (BEST_ADAPTERS, CheckpointMismatchError, config_mismatches, load_adapters,
                                      read_best, save_adapters)
from moa_jax.config import (DATA_SPLITS, EXPERTS_FROM_DATA, ROUTING_DECISION_FIELDS, ConfigError, ExperimentConfig,
                            ModelConfig, MoAConfig, TrainConfig, experiment_keys, replace, stage_absent_values,
                            stage_keys, stage_renamed_values)
from moa_jax.data.pipeline import TrainBatches, ValidationBatches, load_split
from moa_jax.data.prompt_format import resolve_prompt_format
from moa_jax.data.sources import load_text_split, resolve_system_prompt
from moa_jax.errors import check_rank_fits, check_writable
from moa_jax.methods import METHODS
from moa_jax.variants import Variant, parse_variant
from moa_jax.loading.base import check_base_model, default_dtype, load_base_model
from moa_jax.loading.tokenizer import MissingTokenizerError
from moa_jax.eval.calibration import routing_study, write_routing_file
from moa_jax.eval.evaluate import Method
from moa_jax.eval.suite import evaluate_all
from moa_jax.train.metrics_log import log_eval_scalars
from moa_jax.nn.model import MoATransformer
from moa_jax.params import check_tree, init_trainable, merge_params, param_shapes, split_params
from moa_jax.routing import AUTO, resolve
from moa_jax.peft_import import experts_for_domains, parse_adapter_specs
from moa_jax.run_artifacts import CONFIG_FILE, RunArtifactError, read_json, stage_adapters
from moa_jax.sharding import (check_batch_divisible, check_experts_divisible, leaf_placer, make_mesh,
                              param_shardings)
from moa_jax.train.loop import train_stage
from moa_jax.train.router_fit import fit_routers
from moa_jax.train.wandb_log import WandbLog, require_wandb

log = logging.getLogger("moa_jax")
class _Concat:
    """Micro-batch stream that replays stage 1's batches, then stage 2's (the mixed-LoRA baseline sees the same
    examples as MoA)."""

    def __init__(self, first, first_len: int, second):
        self.first, self.first_len, self.second = first, first_len, second

    def batch(self, index: int) -> dict:
        return self.first.batch(index) if index < self.first_len else self.second.batch(index - self.first_len)


@dataclasses.dataclass
class ExperimentContext:
    """Everything the stages and the evaluation share."""
    exp: ExperimentConfig
    workdir: str
    cfg: ModelConfig
    tokenizer: Any
    mesh: Any
    frozen: Any
    frozen_shardings: Any
    data: dict            # split -> TokenizedSplit
    domains: tuple
    stage_dirs: dict = dataclasses.field(default_factory=dict)  # "stage1", "variants/eta0/stage2" -> its directory
    router_fits: dict = dataclasses.field(default_factory=dict)  # stage label -> fit_stage_routers' stats
    watch: Any = None     # the W&B run (moa_jax/train/wandb_log.py) when ExperimentConfig.wandb names a project

    def config_dict(self, stage: str, moa: MoAConfig, tcfg: TrainConfig) -> dict:
        """A stage's resolved config (checkpoints, adapters/config.json): data.prompt_format as chat or plain, the
        format the tokenizer resolved, so loading never guesses (<workdir>/config.json keeps the setting as given)."""
        data = replace(self.exp.data, prompt_format=resolve_prompt_format(self.exp.data.prompt_format, self.tokenizer))
        return {"experiment": self.exp.name, "stage": stage, "model": {"source": self.exp.model,
                **dataclasses.asdict(self.cfg)}, "moa": dataclasses.asdict(moa), "train": dataclasses.asdict(tcfg),
                "data": dataclasses.asdict(data), "domains": list(self.domains)}

    def source(self, seed_offset: int, accum: int) -> TrainBatches:
        data_cfg = replace(self.exp.data, seed=self.exp.data.seed + seed_offset)
        return TrainBatches(self.data["train"], data_cfg, process_index=jax.process_index(),
                             process_count=jax.process_count(), micro_batches=accum)

    def evaluate(self, trained: dict, specs, progress: bool) -> dict:
        """eval.suite.evaluate_all on this context's base model, tokenizer and data."""
        return evaluate_all(self.cfg, self.frozen, self.tokenizer, self.data, trained, specs, ev=self.exp.eval,
                            buckets=self.exp.data.buckets, progress=progress)

    def watching(self, label: str, tcfg: TrainConfig) -> dict:
        """train_stage's validation batches (when tcfg.eval_every asks for them) and its W&B hook, for stage `label`."""
        out: dict[str, Any] = {}
        if tcfg.eval_every:
            out["validation"] = ValidationBatches(self.data["validation"], self.exp.data, tcfg.eval_batches,
                                                  process_index=jax.process_index(),
                                                  process_count=jax.process_count())
        if self.watch is not None:
            out["on_log"] = functools.partial(self.watch.log, label)
        return out

    def close(self) -> None:
        """Ends the W&B run, if any."""
        if self.watch is not None:
            self.watch.finish()
            self.watch = None

    def train(self, stage: str, moa: MoAConfig, tcfg: TrainConfig, init: Any, source, progress: bool,
              subdir: str = ""):
        """Train one stage in workdir/subdir/stage (or load it from reuse_from). -> (trainable, log history)."""
        label, config = os.path.join(subdir, stage), self.config_dict(stage, moa, tcfg)
        own = os.path.isdir(os.path.join(self.workdir, label, "checkpoints"))   # resuming here wins over reuse
        if self.exp.reuse_from and not subdir and not own:
            reused = _reuse(self.exp.reuse_from, stage, config, self.cfg, moa)
            if reused is not None:
                trainable, self.stage_dirs[label] = reused
                return trainable, []
        log.info("== %s: %d steps, E=%d, dispatch=%s", label, tcfg.steps, moa.num_experts, moa.dispatch)
        self.stage_dirs[label] = os.path.join(self.workdir, label)
        return train_stage(model=MoATransformer(self.cfg, moa), tcfg=tcfg, mesh=self.mesh, frozen=self.frozen,
                           trainable=init, source=source, workdir=self.stage_dirs[label], config=config,
                           domain_names=self.domains, frozen_shardings=self.frozen_shardings, progress=progress,
                           desc=label, **self.watching(label, tcfg))


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every training-relevant entry where two stage configs differ."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    saved = {k: v for k, v in saved.items() if k != "router_fit"}   # what a fit did, not a setting
    a, b = flat(json.loads(json.dumps(saved, default=str))), flat(json.loads(json.dumps(current, default=str)))
    for side in (a, b):   # a config written before a field existed ran with what that field's default means
        if "moa.rank" in side:
            for key, value in stage_absent_values().items():
                side.setdefault(key, value)
        for key, renamed in stage_renamed_values().items():
            if side.get(key) in renamed:
                side[key] = renamed[side[key]]
    # fields that do not change what a stage learns, and the stage-2-only ones outside stage 2
    ignored = stage_keys("inert") + (() if current.get("stage") == "stage2" else stage_keys("stage2"))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignored and a.get(k) != b.get(k)]


def _reuse(other_workdir: str, stage: str, config: dict, cfg: ModelConfig, moa: MoAConfig):
    """(adapters of `stage` from another run, that stage's directory) when its config matches; None (train here)
    when it does not; an error for stage 1, which every later stage builds on. A stage the other run itself reused
    is followed to the run that trained it (its results.json "stages")."""
    try:
        directory = stage_adapters(other_workdir, stage)
    except RunArtifactError as e:
        if stage == "stage1":
            raise ConfigError(f"reuse_from={other_workdir!r}: no stage-1 adapters to reuse: {e}") from None
        log.info("reuse_from: no %s adapters in %s; training %s here", stage, other_workdir, stage)
        return None
    trainable, saved = load_adapters(directory)
    diff = config_differences(saved, config)
    if diff:
        if stage == "stage1":
            raise ConfigError(f"reuse_from={other_workdir!r}: its stage 1 was trained with a different config, so "
                              f"its adapters cannot stand in for this run's stage 1: " + "; ".join(diff))
        log.info("reuse_from: %s of %s differs (%s); training it here", stage, other_workdir, "; ".join(diff))
        return None
    check_tree(split_params(param_shapes(cfg, moa))[1], trainable, directory)
    log.info("== %s: reusing the adapters in %s (same config)", stage, directory)
    return trainable, os.path.dirname(directory)


def check_run_dir(workdir: str, exp: ExperimentConfig) -> None:
    """A work directory holding checkpoints of another configuration is refused before anything loads."""
    path = os.path.join(workdir, "config.json")
    stages = [p for pattern in ("*/checkpoints", "variants/*/*/checkpoints", "arms/*/*/checkpoints")
              for p in glob.glob(os.path.join(glob.escape(workdir), pattern))]
    if not os.path.exists(path) or not stages:
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); use a new --workdir, or delete {workdir}") from None
    current = json.loads(json.dumps(dataclasses.asdict(exp), default=str))
    # what a work directory's runs must share: the fields marked "function" (checkpoint.MUST_MATCH per stage)
    for key, a, b in config_mismatches(saved, current, experiment_keys("function"))[:1]:
        raise CheckpointMismatchError(
            f"{workdir} holds a run with {key}={a!r} ({path}) but this command has {key}={b!r}; use a new "
            f"--workdir, or --set {key}={','.join(a) if isinstance(a, list) else a} to continue that run")


def log_domain_census(text) -> None:
    """With line-level JSONL domains: the domain table (name, lines, source files) and typo warnings."""
    census = text.census
    if census is not None and census.line_level:
        log.info("domains of %s (from each line's \"domain\" key):\n%s", text.name, census.table())
        for warning in census.warnings():
            log.warning("%s: %s", text.name, warning)


def prepare(exp: ExperimentConfig, workdir: str, texts: dict | None = None, workflow: str = "two_stage",
            section: Any = None, final_stage: str = "stage2") -> ExperimentContext:
    """Check what is cheap to check (work directory, data files, model file, mesh), then load the base model,
    tokenise the data, build the mesh and place the frozen weights. `texts`: split -> TextSplit read already
    (default: read from exp.data). moa.num_experts is resolved from the data's domains here (MoAConfig.for_domains),
    before anything is built: the context's `exp` holds the number, and so do <workdir>/config.json (the experiment,
    the workflow, its section and the stage of its final model: what `moa_jax.load_run(workdir)` loads) and every
    stage's checkpoints and adapters."""
    check_writable(workdir)
    if exp.wandb:
        require_wandb(exp.wandb)   # a missing package is an error before anything loads
    texts = texts or {split: load_text_split(exp.data, split) for split in DATA_SPLITS}
    log_domain_census(texts["train"])
    domains = tuple(texts["train"].domains)
    if exp.moa.num_experts == EXPERTS_FROM_DATA:
        log.info("moa.num_experts=%d: one expert per domain of the data", len(domains))
    exp = replace(exp, moa=exp.moa.for_domains(domains))
    check_run_dir(workdir, exp)
    mesh = make_mesh(exp.mesh)
    check_experts_divisible(mesh, exp.moa.num_experts)
    check_batch_divisible(mesh, exp.data.batch_size)
    check_base_model(exp.model)
    dtype = default_dtype(exp.dtype)
    t0 = time.perf_counter()
    # each base leaf goes onto the mesh as soon as it is read: the host never holds the whole base
    cfg, frozen, tokenizer = load_base_model(exp.model, dtype, exp.quantize, leaf_placer(mesh, exp.mesh.fsdp))
    if tokenizer is None:   # a checkpoint saved without its tokenizer: logits only, nothing to tokenise data with
        raise MissingTokenizerError(f"model={exp.model!r} has weights but no tokenizer files (tokenizer.json, or "
                                    f"tokenizer.model + tokenizer_config.json); training tokenises the data with it: "
                                    f"copy the base model's tokenizer files into that directory")
    cfg = replace(cfg, remat=exp.remat, loss_chunk=exp.loss_chunk)
    check_rank_fits(cfg, exp.moa)   # the first point the projection widths are known
    log.info("base model %s loaded in %.1fs: L=%d D=%d V=%d", exp.model, time.perf_counter() - t0,
             cfg.num_layers, cfg.hidden_size, cfg.vocab_size)
    data = {split: load_split(exp.data, tokenizer, split, text) for split, text in texts.items()}
    for split, ts in data.items():
        log.info("%s", ts.report)
    shardings = param_shardings(mesh, frozen, exp.mesh.fsdp)
    record = {"workflow": workflow, "final_stage": final_stage,
              **({workflow: dataclasses.asdict(section)} if section is not None else {}), **dataclasses.asdict(exp)}
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    watch = None
    if exp.wandb and jax.process_index() == 0:
        watch = WandbLog(exp.wandb, name=f"{exp.name} {os.path.basename(os.path.abspath(workdir))}",
                         config=json.loads(json.dumps(record, default=str)), directory=workdir)
    return ExperimentContext(exp, workdir, cfg, tokenizer, mesh, frozen, shardings, data, domains, watch=watch)


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


def fit_stage_routers(ctx: ExperimentContext, moa: MoAConfig, trainable: Any, n_old: int, prompts_per_domain: int,
                      adapters: str) -> tuple[Any, dict]:
    """The routers' outputs n_old.. of `trainable` fitted on cached base-model inputs of the first
    `prompts_per_domain` train prompts of each domain (moa_jax/train/router_fit.py; moa.route_on=probe), written
    over the stage's adapter artifact `adapters` with the fit's stats in its config ("router_fit"). The stage's
    checkpoints keep the SGD routers, so a resumed run fits again from the same start. -> (trainable, stats)."""
    fitted, stats = fit_routers(ctx.cfg, moa, ctx.frozen, ctx.data["train"], trainable, n_old, prompts_per_domain,
                                batch_size=ctx.exp.data.eval_batch, buckets=ctx.exp.data.buckets)
    if jax.process_index() == 0:
        # the stage's saved config (not its weights, which this overwrites) plus the fit's record
        save_adapters(adapters, fitted, {**read_json(os.path.join(adapters, CONFIG_FILE)), "router_fit": stats})
    return fitted, stats


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
