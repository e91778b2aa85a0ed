"""What every workflow shares: the experiment's context (base model, tokenizer, mesh, tokenised data), built once by
`prepare`, and the stage machinery on top of it: train one stage (or take it from reuse_from), fit a stage's
routers. two_stage.py, add_domain.py and capacity.py build on it.

    ExperimentContext.train    one stage in <workdir>/<subdir>/<stage>: resumed from its own checkpoints, loaded
                               from reuse_from when its config matches there, or trained (moa_jax/train/loop.py)
    config_differences         which training-relevant settings two stage configs differ in (reuse, resume)
    check_run_dir              a work directory holding another configuration's checkpoints is refused
    fit_stage_routers          a stage's routers fitted on cached base-model router inputs, saved over its adapters

Trees, not arrays, pass through here (frozen: the base model's parameters on the mesh; trainable: experts and
routers, their leaves' shapes in moa_jax/nn/lora.py and moa_jax/nn/router.py).
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

from moa_jax.config import (DATA_SPLITS, EXPERTS_FROM_DATA, ConfigError, ExperimentConfig, ModelConfig, MoAConfig,
                            TrainConfig, experiment_keys, replace, stage_absent_values, stage_keys,
                            stage_renamed_values)
from moa_jax.data.pipeline import TrainBatches, ValidationBatches, load_split
from moa_jax.data.prompt_format import resolve_prompt_format
from moa_jax.data.sources import load_text_split
from moa_jax.errors import check_rank_fits, check_writable
from moa_jax.eval.suite import evaluate_all
from moa_jax.loading.base import check_base_model, default_dtype, load_base_model
from moa_jax.loading.tokenizer import MissingTokenizerError
from moa_jax.nn.model import MoATransformer
from moa_jax.params import check_tree, param_shapes, split_params
from moa_jax.run_artifacts import CONFIG_FILE, RunArtifactError, read_json, stage_adapters
from moa_jax.sharding import (check_batch_divisible, check_experts_divisible, leaf_placer, make_mesh,
                              param_shardings)
from moa_jax.train.checkpoint import CheckpointMismatchError, config_mismatches, load_adapters, save_adapters
from moa_jax.train.loop import train_stage
from moa_jax.train.router_fit import fit_routers
from moa_jax.train.wandb_log import WandbLog, require_wandb

log = logging.getLogger("moa_jax")


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
