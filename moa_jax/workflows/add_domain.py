"""Add domains to a finished MoA run without retraining it: one new expert per new domain, then a short router
re-fit, then the usual evaluation over all N + N_new domains and a cost comparison.

    python -m experiments.run --exp=add_domain --set add_domain.base_run=DIR \
        --set add_domain.new_domains=SPEC[,SPEC...] [--workdir=OUT]

Steps (OUT = the work directory):
  1. the base run DIR (finished: config.json, results.json, stage-2 adapters) fixes the model, rank, data source
     and the N old domains; every other --set applies on top of its config (stage1.* = the new-expert phase,
     stage2.* = the re-fit, eval.* = the evaluation). Changing the model or the adapter shape is refused.
  2. surgery (moa_jax/grow.py): the stage-2 tree gets N_new fresh experts and N_new more router outputs; experts are
     matched by domain NAME, old expert k keeps domain k's name;
  3. OUT/new_experts: only the new experts train, on the new domains' data, with label routing (stage-1 settings;
     default steps = stage1.steps * N_new / N, so each new expert sees as many examples as an old one did);
  4. OUT/refit: the new experts and the routers' new outputs (`add_domain.refit_routers=new`, default; `all`: every
     router output) train on all domains (stage-2 settings; default steps = stage2.steps / 2), the new domains
     `add_domain.new_share` of every batch (default 0.5; uniform mixing would give them only N_new / (N + N_new), too
     little for a short re-fit), the old ones the rest; the router CE adds log(share) of each domain to its logit
     (TrainConfig.router_prior: logit adjustment), so that share does not become the routers' prior;
     in both phases old experts get no update, no weight decay and no optimiser-state change: bit-identical
     (checked against the base run's adapters before the evaluation);
  4b. with moa.route_on='probe' (the routers read the plain base model): the routers' new outputs are fitted to
     convergence on cached router inputs of `add_domain.router_prompts` training prompts per domain
     (moa_jax/train/router_fit.py; the re-fit's few SGD steps leave a new domain close to an old one just below it); old outputs untouched;
  5. evaluation on the same test items of every domain: moa_router / moa_oracle (the grown MoA), single_lora (the
     base run's stage-1 experts + each new-expert-phase expert, i.e. a single LoRA trained on the new domain
     alone) and moa_router[base_run] (the base run's MoA, N experts); results.json / results.md as usual plus an
     "add_domain" section: routing accuracy over all domains, old domains now vs the base run, the new domains vs
     their single LoRA, and the cost (steps, training seconds) against retraining stage 1 + stage 2 on N + N_new
     domains (the base run's measured stage times scaled by (N + N_new) / N, the same examples per domain).
The grown adapters are OUT/refit/adapters, with the router fit of step 4b when it ran (`python -m moa_jax.cli.generate
--workdir OUT --stage refit`).

Shape glossary: N old domains, N_new new domains, E = N + N_new experts, L layers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import typing

import jax

from moa_jax.config import DATA_SPLITS, ConfigError, ExperimentConfig, experiment_keys, replace
from moa_jax.data.new_domains import extend_split, new_domain_examples, only, parse_new_domains
from moa_jax.data.pipeline import TrainBatches, domain_weights, load_split
from moa_jax.data.sources import load_text_split
from moa_jax.eval.evaluate import Method
from moa_jax.eval.report import router_fit_sentence
from moa_jax.workflows.sections import AddDomainConfig
from moa_jax.workflows.context import ExperimentContext, fit_stage_routers, prepare
from moa_jax.grow import freeze_old_experts, grow_trainable, same_old_experts
from moa_jax.nn.model import MoATransformer
from moa_jax.params import init_trainable
from moa_jax.routing import routes_on_probe
from moa_jax.run_artifacts import RunArtifactError, read_json, stage_adapters
from moa_jax.train.checkpoint import load_adapters, lookup_key
from moa_jax.train.loop import train_stage
from moa_jax.train.metrics_log import read_metrics
from moa_jax.train.step import make_optimizer

log = logging.getLogger("moa_jax")


def experiment_from_dict(d: dict, cls=ExperimentConfig):
    """A config dataclass from its dataclasses.asdict JSON (lists become tuples; unknown keys are ignored)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value, kind = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = experiment_from_dict(value, kind)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


@dataclasses.dataclass
class BaseRun:
    """A finished run: its config, domain (expert) names, stage directories and results."""
    workdir: str
    exp: ExperimentConfig
    domains: tuple
    stage1: str | None     # stage-1 adapters directory (None: imported from PEFT, or absent)
    stage2: str
    results: dict


def load_base_run(path: str) -> BaseRun:
    """The run in `path`, checked to be finished; UserErrors name the missing piece."""
    where = f"add_domain.base_run={path}"
    if not path:
        raise ConfigError("add_domain needs the run to extend: --set add_domain.base_run=DIR (the --workdir of a "
                          "finished run)")
    if not os.path.isdir(path):
        raise ConfigError(f"{where}: no such directory; give the --workdir of a finished python -m experiments.run")
    for name, what in (("config.json", "not the work directory of python -m experiments.run"),
                       ("results.json", "unfinished (no results.json: it has not been evaluated); finish it by "
                                        "running its command again")):
        if not os.path.isfile(os.path.join(path, name)):
            raise ConfigError(f"{where}: {what}")
    config, results = (read_json(os.path.join(path, name)) for name in ("config.json", "results.json"))
    if config.get("workflow") == "add_domain" or config.get("base_run"):   # "base_run": runs saved before sections
        of = (config.get("add_domain") or {}).get("base_run") or config.get("base_run")
        raise ConfigError(f"{where} is itself an add_domain run (of {of}); add every new domain to that base run in "
                          f"one command instead")
    exp = experiment_from_dict(config)
    try:   # the run's own stage directories, or those it reused from another run (results.json "stages")
        stage2 = stage_adapters(path, "stage2")
    except RunArtifactError as e:
        raise ConfigError(f"{where}: unfinished: {e}") from None
    try:
        stage1 = stage_adapters(path, "stage1")
    except RunArtifactError:
        stage1 = None    # stage 1 imported from PEFT adapters: no stage-1 artifact
    domains = tuple(read_json(os.path.join(stage2, "config.json")).get("domains") or results["domains"])
    return BaseRun(path, exp, domains, stage1, stage2, results)


def _check_locked(base: ExperimentConfig, child: ExperimentConfig, where: str) -> None:
    a, b = (json.loads(json.dumps(dataclasses.asdict(c), default=str)) for c in (base, child))
    for key in experiment_keys("locked"):   # the base model, the adapters' shape and the data stay the base run's
        if lookup_key(a, key) != lookup_key(b, key):
            raise ConfigError(f"{where} was trained with {key}={lookup_key(a, key)!r}, not {lookup_key(b, key)!r}: "
                              f"add_domain keeps the base run's model and adapter shape; drop that --set, or train "
                              f"a new run")


class _Offset:
    """A batch source whose domain ids are shifted by `offset` (new-domain-only batches -> the new experts)."""

    def __init__(self, inner, offset: int):
        self.inner, self.offset = inner, offset

    def batch(self, index: int) -> dict:
        out = dict(self.inner.batch(index))
        out["domain"] = out["domain"] + self.offset
        return out


def plan(base: BaseRun, new_specs, sets) -> tuple[ExperimentConfig, list, dict]:
    """-> (the add_domain ExperimentConfig, parsed new domains, split -> TextSplit of all domains)."""
    from moa_jax.overrides import apply_overrides
    specs = parse_new_domains(new_specs)
    clash = [d.name for d in specs if d.name in base.domains]
    if clash:
        raise ConfigError(f"add_domain.new_domains: {clash} already exist in add_domain.base_run={base.workdir} (its "
                          f"domains: {list(base.domains)}); name the new domain apart: NAME=SPEC")
    keys = {s.split("=", 1)[0].strip() for s in sets}
    child = apply_overrides(base.exp, sets)
    _check_locked(base.exp, child, f"add_domain.base_run={base.workdir}")
    n_old, n_new = len(base.domains), len(specs)
    old = {s: load_text_split(base.exp.data, s) for s in DATA_SPLITS}
    if tuple(old["train"].domains) != base.domains:
        raise ConfigError(f"add_domain.base_run={base.workdir}: its data now has domains "
                          f"{list(old['train'].domains)}, but its experts are {list(base.domains)}; restore its data "
                          f"source")
    sizes = {s: len(old[s].examples[base.domains[0]]) for s in DATA_SPLITS}
    new = new_domain_examples(specs, sizes, child.data.holdout_fraction)
    texts = {s: extend_split(old[s], new[s]) for s in DATA_SPLITS}
    # derived budgets are at least 2 steps: the warmup's step 0 has learning rate 0
    s1 = child.stage1.steps if "stage1.steps" in keys else max(2, math.ceil(base.exp.stage1.steps * n_new / n_old))
    s2 = child.stage2.steps if "stage2.steps" in keys else max(2, math.ceil(base.exp.stage2.steps / 2))
    exp = replace(child, name="add_domain", moa=replace(child.moa, num_experts=n_old + n_new),
                  stage1=replace(child.stage1, steps=s1, init_from_peft=()), stage2=replace(child.stage2, steps=s2),
                  variants=(), reuse_from="")
    return exp, specs, texts


def refit_weights(counts, n_old: int, share: float, mixing: str = "uniform", temperature: float = 2.0):
    """Sampling weights [N + N_new] of the re-fit: the new domains (the last N_new) get `share` of the total, the
    old ones 1 - share; within each group the weights follow data.mixing (uniform: equal)."""
    old, new = (domain_weights(c, mixing, temperature) for c in (counts[:n_old], counts[n_old:]))
    return [float(w) for w in (1.0 - share) * old] + [float(w) for w in share * new]


def refit_source(exp: ExperimentConfig, train, n_old: int, new_share: float) -> TrainBatches:
    """The re-fit's batches over all domains of the TokenizedSplit `train` (stage 2's seed offset), the new domains
    `new_share` of each batch."""
    counts = [len(train.domain_rows(d)) for d in range(len(train.domains))]
    weights = refit_weights(counts, n_old, new_share, exp.data.mixing, exp.data.temperature)
    return TrainBatches(train, replace(exp.data, seed=exp.data.seed + 1), process_index=jax.process_index(),
                        process_count=jax.process_count(), micro_batches=exp.stage2.grad_accum, weights=weights)


def _train(ctx: ExperimentContext, name: str, tcfg, init, source, n_old: int, progress: bool, routers=False):
    """One phase in workdir/name with the old experts (and with `routers` the routers' old outputs) frozen.
    -> (trainable, seconds of this call)."""
    t0 = time.perf_counter()
    directory = os.path.join(ctx.workdir, name)
    ctx.stage_dirs[name] = directory
    log.info("== %s: %d steps, E=%d (experts 0..%d frozen)", name, tcfg.steps, ctx.exp.moa.num_experts, n_old - 1)
    trained, _ = train_stage(
        model=MoATransformer(ctx.cfg, ctx.exp.moa), tcfg=tcfg, mesh=ctx.mesh, frozen=ctx.frozen, trainable=init,
        source=source, workdir=directory, config=ctx.config_dict(name, ctx.exp.moa, tcfg), domain_names=ctx.domains,
        frozen_shardings=ctx.frozen_shardings, progress=progress, desc=name,
        tx=freeze_old_experts(make_optimizer(tcfg, init), n_old, routers=routers), **ctx.watching(name, tcfg))
    return trained, time.perf_counter() - t0


def logged_seconds(stage_dir: str) -> float:
    """Training seconds a stage logged (metrics.jsonl `seconds`: the time between log steps, compile included)."""
    return float(sum(r.get("seconds", 0.0) for r in read_metrics(os.path.join(stage_dir, "metrics.jsonl"))))


def cost(base: BaseRun, exp: ExperimentConfig, ctx: ExperimentContext, wall: dict) -> dict:
    """add_domain's steps and seconds against retraining stage 1 + stage 2 on all domains (estimated from the base
    run's logged stage times, scaled by (N + N_new) / N: the same examples per domain at the same batch size)."""
    n_old, n_all = len(base.domains), exp.moa.num_experts
    scale = n_all / n_old
    stages = base.results.get("stages", {})
    base_secs = {s: logged_seconds(stages.get(s, os.path.join(base.workdir, s))) for s in ("stage1", "stage2")}
    retrain_steps = {s: math.ceil(getattr(base.exp, s).steps * scale) for s in ("stage1", "stage2")}
    ours_secs = {p: logged_seconds(ctx.stage_dirs[p]) for p in ("new_experts", "refit")}
    ours = {"new_experts": {"steps": exp.stage1.steps, "seconds": ours_secs["new_experts"],
                            "wall_seconds": wall["new_experts"]},
            "refit": {"steps": exp.stage2.steps, "seconds": ours_secs["refit"], "wall_seconds": wall["refit"]}}
    total = {"steps": exp.stage1.steps + exp.stage2.steps, "seconds": sum(ours_secs.values())}
    retrain = {"steps": sum(retrain_steps.values()), "seconds": sum(base_secs.values()) * scale,
               "per_stage_steps": retrain_steps, "base_run_seconds": base_secs, "scale": scale}
    return {"add_domain": {**ours, "total": total}, "retrain_estimate": retrain,
            "step_ratio": total["steps"] / max(retrain["steps"], 1),
            "seconds_ratio": total["seconds"] / retrain["seconds"] if retrain["seconds"] else None,
            "how": f"retraining = the base run's stage 1 + stage 2 on {n_all} domains: its steps and logged training "
                   f"seconds (metrics.jsonl) x {n_all}/{n_old}, the same examples per domain at batch "
                   f"{exp.data.batch_size}; add_domain's seconds are logged the same way (compile included)"}


def summary_section(results: dict, base: BaseRun, new_names: list) -> dict:
    """Routing over all domains, old domains now vs the base run, new domains vs their single LoRA."""
    methods = results["methods"]
    now, before = methods["moa_router"], methods["moa_router[base_run]"]
    old = [d for d in results["domains"] if d not in new_names]
    pick = lambda e, d, m: e["per_domain"][d].get(m)   # noqa: E731
    out = {"base_run": base.workdir, "old_domains": old, "new_domains": new_names,
           "routing_accuracy": now.get("mean_routing_accuracy"),
           "routing_accuracy_per_domain": {d: pick(now, d, "routing_accuracy") for d in results["domains"]},
           "old_vs_base_run": {d: {m: {"base_run": pick(before, d, m), "now": pick(now, d, m)}
                                   for m in ("accuracy", "ppl", "routing_accuracy")} for d in old},
           "new_vs_single_lora": {d: {label: {m: pick(methods[label], d, m) for m in ("accuracy", "ppl")}
                                      for label in ("single_lora", "moa_oracle", "moa_router") if label in methods}
                                  for d in new_names}}
    return out


def markdown_section(section: dict, cost_: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"   # noqa: E731
    lines = ["", "## Add a domain", "",
             f"Base run `{section['base_run']}` ({len(section['old_domains'])} domains) + new domain(s) "
             f"{', '.join(f'`{d}`' for d in section['new_domains'])}. Old experts bit-identical to the base run's: "
             f"{section['old_experts_bit_identical']}. Routing accuracy of `moa_router` over all "
             f"{len(section['routing_accuracy_per_domain'])} domains: {f(section['routing_accuracy'])}. The router "
             f"re-fit gave the new domains {section['new_share']:.2f} of every batch (add_domain.new_share)."
             + (" " + router_fit_sentence(section["router_fit"], "add_domain.router_prompts",
                                          "The routers' new outputs") if section.get("router_fit") else ""), "",
             "| old domain | accuracy base run | accuracy now | PPL base run | PPL now | routing base run | routing now |",
             "|---|---|---|---|---|---|---|"]
    for d, r in section["old_vs_base_run"].items():
        lines.append(f"| {d} | {f(r['accuracy']['base_run'])} | {f(r['accuracy']['now'])} | {f(r['ppl']['base_run'])}"
                     f" | {f(r['ppl']['now'])} | {f(r['routing_accuracy']['base_run'])} | "
                     f"{f(r['routing_accuracy']['now'])} |")
    lines += ["", "New domains: `single_lora` is the new-expert phase's expert alone (a single LoRA trained on that "
              "domain only, domain given); `moa_oracle` / `moa_router` the grown MoA after the re-fit.", "",
              "| new domain | single_lora acc | moa_oracle acc | moa_router acc | single_lora PPL | moa_router PPL | "
              "routing |", "|---|---|---|---|---|---|---|"]
    for d, r in section["new_vs_single_lora"].items():
        g = lambda label, m: f(r.get(label, {}).get(m))   # noqa: E731
        lines.append(f"| {d} | {g('single_lora', 'accuracy')} | {g('moa_oracle', 'accuracy')} | "
                     f"{g('moa_router', 'accuracy')} | {g('single_lora', 'ppl')} | {g('moa_router', 'ppl')} | "
                     f"{f(section['routing_accuracy_per_domain'][d])} |")
    a, r = cost_["add_domain"], cost_["retrain_estimate"]
    lines += ["", "| cost | steps | training seconds |", "|---|---|---|",
              f"| add_domain: new experts | {a['new_experts']['steps']} | {a['new_experts']['seconds']:.1f} |",
              f"| add_domain: router re-fit | {a['refit']['steps']} | {a['refit']['seconds']:.1f} |",
              f"| add_domain total | {a['total']['steps']} | {a['total']['seconds']:.1f} |",
              f"| retrain stage 1 + stage 2 (estimate) | {r['steps']} | {r['seconds']:.1f} |", "",
              f"How: {cost_['how']}.", ""]
    return "\n".join(lines)


def run_add_domain(settings: AddDomainConfig, workdir: str, sets=(), progress: bool = True) -> dict:
    """The whole add_domain pipeline (module docstring); writes the report into `workdir`, returns the results."""
    from moa_jax.eval.report import write_report
    t0 = time.perf_counter()
    base = load_base_run(settings.base_run)
    exp, specs, texts = plan(base, settings.new_domains, sets)
    settings = replace(settings, base_run=os.path.abspath(base.workdir))
    n_old, new_names = len(base.domains), [d.name for d in specs]
    log.info("add_domain: %s (%d domains) + %s -> %s\n%s", base.workdir, n_old, new_names, workdir,
             json.dumps(dataclasses.asdict(exp), indent=1, default=str))
    ctx = prepare(exp, workdir, texts=texts, workflow="add_domain", section=settings,
                  final_stage="refit")
    moa_old, _ = load_adapters(base.stage2, {"model": {"source": base.exp.model, **dataclasses.asdict(ctx.cfg)},
                                                 "moa": dataclasses.asdict(base.exp.moa)})
    key = jax.random.fold_in(jax.random.PRNGKey(exp.stage1.seed), 5)
    init = grow_trainable(moa_old, init_trainable(ctx.cfg, exp.moa, key), n_old)
    new_train = load_split(exp.data, ctx.tokenizer, "train", only(texts["train"], new_names))
    src = _Offset(TrainBatches(new_train, replace(exp.data, seed=exp.data.seed + 5), process_index=jax.process_index(),
                               process_count=jax.process_count(), micro_batches=exp.stage1.grad_accum), n_old)
    experts, wall1 = _train(ctx, "new_experts", exp.stage1, init, src, n_old, progress)
    log.info("add_domain: the re-fit gives the new domains %.2f of every batch; router outputs trained: %s",
             settings.new_share, settings.refit_routers)
    refit_src = refit_source(exp, ctx.data["train"], n_old, settings.new_share)
    # the router CE corrects for the re-fit's sampling shares (logit adjustment): routers learn the prompts, not
    # that half of every batch is new
    refit_cfg = replace(exp.stage2, router_prior=tuple(float(w) for w in refit_src.weights))
    refit, wall2 = _train(ctx, "refit", refit_cfg, experts, refit_src, n_old, progress,
                          routers=settings.refit_routers == "new")
    fit_stats = None
    if routes_on_probe(exp.moa) and settings.router_prompts > 0:
        # refit/adapters: the grown model as evaluated (its checkpoints: the SGD re-fit)
        refit, fit_stats = fit_stage_routers(ctx, exp.moa, refit, n_old, settings.router_prompts,
                                             os.path.join(ctx.stage_dirs["refit"], "adapters"))
    changed = same_old_experts(moa_old, refit, n_old)
    if changed:   # the update mask failed: a bug, not a user mistake
        raise AssertionError(f"add_domain: old experts changed in {changed[:4]}")
    trained = {"moa": (exp.moa, refit), "base_run_moa": (base.exp.moa, moa_old)}
    specs_eval = [Method("moa_router"), Method("moa_oracle"),
                  Method("moa_router", base.exp.moa, label="moa_router[base_run]", key="base_run_moa")]
    if base.stage1 is not None:
        trained["single_lora"] = (exp.moa, grow_trainable(load_adapters(base.stage1)[0], experts, n_old))
        specs_eval.insert(0, Method("single_lora"))
    else:
        log.info("add_domain: the base run has no stage-1 adapters; single_lora is not evaluated")
    results = ctx.evaluate(trained, specs_eval, progress)
    ctx.close()   # the W&B run, if any
    section = summary_section(results, base, new_names)
    section["old_experts_bit_identical"] = not changed
    section["new_share"], section["refit_routers"] = settings.new_share, settings.refit_routers
    section["router_fit"] = fit_stats
    section["cost"] = cost(base, exp, ctx, {"new_experts": wall1, "refit": wall2})
    results.update(experiment=exp.name, model=exp.model, runtime_seconds=time.perf_counter() - t0,
                   backend=jax.default_backend(), stages={"base_run stage2": os.path.dirname(base.stage2),
                                                          **ctx.stage_dirs},
                   steps={"new_experts": exp.stage1.steps, "refit": exp.stage2.steps,
                          "batch_size": exp.data.batch_size, "new_share": settings.new_share,
                          "refit_routers": settings.refit_routers},
                   add_domain=section)
    if jax.process_index() == 0:
        write_report(results, workdir)
        with open(os.path.join(workdir, "results.md"), "a") as f:
            f.write(markdown_section(section, section["cost"]))
    log.info("add_domain: routing accuracy over %d domains %.3f; old experts bit-identical; training %.0f s vs an "
             "estimated %.0f s to retrain", exp.moa.num_experts, section["routing_accuracy"] or float("nan"),
             section["cost"]["add_domain"]["total"]["seconds"], section["cost"]["retrain_estimate"]["seconds"])
    return results
