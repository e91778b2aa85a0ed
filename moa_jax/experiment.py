"""One MoA experiment end to end: base model + data -> stage 1 -> stage 2 -> baselines -> evaluation -> results.

    workdir/config.json                  the resolved ExperimentConfig
    workdir/stage1/  stage2/  mixed_lora/  moe_lora/    each: checkpoints/, adapters/, metrics.jsonl, tensorboard/
    workdir/results.json (+ the report files written by report.py)

Every stage resumes from its own checkpoints, so re-running the same command after an interruption continues
where it stopped and a finished stage is not trained again. Restore order per stage: its own checkpoint > the
previous stage's adapters (stage 2 <- stage 1) > fresh experts on the frozen base.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Optional

import jax
import numpy as np

from moa_jax.config import ConfigError, ExperimentConfig, ModelConfig, MoAConfig, TrainConfig, replace
from moa_jax.data.pipeline import TrainIterator, load_split
from moa_jax.model import MoATransformer
from moa_jax.params import init_params, init_trainable, merge_params, split_params
from moa_jax.sharding import (check_batch_divisible, check_experts_divisible, make_mesh, param_shardings,
                              put_params)
from moa_jax.train import train_stage

log = logging.getLogger("moa_jax")
TINY_RANDOM = "tiny-random"


def tiny_model_config(vocab_size: int) -> ModelConfig:
    """The random tiny Llama used by the smoke experiment (with the embedded tokenizer's vocabulary)."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, tie_word_embeddings=True, name="tiny-random")


def load_base_model(source: str, dtype: str):
    """-> (ModelConfig, frozen numpy params, tokenizer)."""
    from moa_jax import loading
    if source == TINY_RANDOM:
        tokenizer = loading.load_tokenizer(loading.DEFAULT_MODEL)
        cfg = replace(tiny_model_config(len(tokenizer)), dtype=dtype, param_dtype=dtype)
        return cfg, jax.device_get(init_params(cfg, None, jax.random.PRNGKey(1234))), tokenizer
    cfg, params = loading.load_checkpoint(source, param_dtype=dtype)
    return replace(cfg, dtype=dtype, param_dtype=dtype), params, loading.load_tokenizer(source)


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

    def config_dict(self, stage: str, moa: MoAConfig, tcfg: TrainConfig) -> dict:
        return {"experiment": self.exp.name, "stage": stage, "model": {"source": self.exp.model,
                **dataclasses.asdict(self.cfg)}, "moa": dataclasses.asdict(moa), "train": dataclasses.asdict(tcfg),
                "data": dataclasses.asdict(self.exp.data), "domains": list(self.domains)}

    def source(self, seed_offset: int, accum: int) -> TrainIterator:
        data_cfg = replace(self.exp.data, seed=self.exp.data.seed + seed_offset)
        return TrainIterator(self.data["train"], data_cfg, process_index=jax.process_index(),
                             process_count=jax.process_count(), micro_batches=accum)

    def train(self, stage: str, moa: MoAConfig, tcfg: TrainConfig, init: Any, source, progress: bool):
        log.info("== %s: %d steps, E=%d, dispatch=%s", stage, tcfg.steps, moa.num_experts, moa.dispatch)
        return train_stage(model=MoATransformer(self.cfg, moa), tcfg=tcfg, mesh=self.mesh, frozen=self.frozen,
                           trainable=init, source=source, workdir=os.path.join(self.workdir, stage),
                           config=self.config_dict(stage, moa, tcfg), domain_names=self.domains,
                           frozen_shardings=self.frozen_shardings, progress=progress, desc=stage)


def prepare(exp: ExperimentConfig, workdir: str) -> ExperimentContext:
    """Load the base model and the data, build the mesh, place the frozen weights."""
    os.makedirs(workdir, exist_ok=True)
    dtype = exp.dtype if exp.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    mesh = make_mesh(exp.mesh)
    t0 = time.perf_counter()
    cfg, frozen_np, tokenizer = load_base_model(exp.model, dtype)
    log.info("base model %s loaded in %.1fs: L=%d D=%d V=%d", exp.model, time.perf_counter() - t0,
             cfg.num_layers, cfg.hidden_size, cfg.vocab_size)
    data = {split: load_split(exp.data, tokenizer, split) for split in ("train", "validation", "test")}
    for split, ts in data.items():
        log.info("%s", ts.report)
    domains = tuple(data["train"].domains)
    if exp.moa.num_experts != len(domains):
        raise ConfigError(f"moa.num_experts={exp.moa.num_experts} but the data has {len(domains)} domains "
                          f"{list(domains)}: MoA trains one expert per domain; --set moa.num_experts={len(domains)}")
    check_experts_divisible(mesh, exp.moa.num_experts)
    check_batch_divisible(mesh, exp.data.batch_size)
    shardings = param_shardings(mesh, frozen_np, exp.mesh.fsdp)
    frozen = put_params(frozen_np, shardings)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(exp), f, indent=1, default=str)
    return ExperimentContext(exp, workdir, cfg, tokenizer, mesh, frozen, shardings, data, domains)


def train_all(ctx: ExperimentContext, progress: bool = True) -> dict[str, tuple[MoAConfig, Any]]:
    """Stage 1, stage 2 and the baselines the evaluation asks for. -> {name: (MoAConfig, trainable tree)}."""
    exp, moa = ctx.exp, ctx.exp.moa
    methods = set(exp.eval.methods)
    key = jax.random.PRNGKey(exp.stage1.seed)
    out: dict[str, tuple[MoAConfig, Any]] = {}
    src1, src2 = ctx.source(0, exp.stage1.grad_accum), ctx.source(1, exp.stage2.grad_accum)
    stage1, _ = ctx.train("stage1", moa, exp.stage1, init_trainable(ctx.cfg, moa, key), src1, progress)
    out["single_lora"] = (moa, stage1)
    init2 = stage1 if exp.stage2.expert_init == "stage1" else init_trainable(ctx.cfg, moa, jax.random.fold_in(key, 2))
    stage2, _ = ctx.train("stage2", moa, exp.stage2, init2, src2, progress)
    out["moa"] = (moa, stage2)
    if "mixed_lora" in methods:
        moa1 = replace(moa, num_experts=1)
        first = exp.stage1.steps * exp.stage1.grad_accum
        total = first + exp.stage2.steps * exp.stage2.grad_accum
        tcfg = exp.baseline
        if tcfg.steps == 0:  # same examples as stage 1 + stage 2
            tcfg = replace(tcfg, steps=total // tcfg.grad_accum)
        mixed, _ = ctx.train("mixed_lora", moa1, tcfg, init_trainable(ctx.cfg, moa1, jax.random.fold_in(key, 3)),
                             _Concat(src1, first, src2), progress)
        out["mixed_lora"] = (moa1, mixed)
    if "moe_lora" in methods:
        moe = replace(moa, dispatch="token_topk")
        tcfg = exp.moe_lora if exp.moe_lora.steps else replace(exp.moe_lora, steps=exp.stage2.steps)
        init = stage1 if tcfg.expert_init == "stage1" else init_trainable(ctx.cfg, moe, jax.random.fold_in(key, 4))
        moe_tr, _ = ctx.train("moe_lora", moe, tcfg, init, src2, progress)
        out["moe_lora"] = (moe, moe_tr)
    return out


def method_params(ctx: ExperimentContext, trained: dict, name: str):
    """-> evaluate.Method for one method name."""
    from moa_jax.evaluate import Method
    frozen = jax.device_get(ctx.frozen) if jax.process_count() == 1 else ctx.frozen
    if name == "base":
        return Method(name, None, frozen)
    source = {"single_lora": "single_lora", "mixed_lora": "mixed_lora", "moa_router": "moa", "moa_oracle": "moa",
              "moe_lora": "moe_lora"}[name]
    moa, trainable = trained[source]
    return Method(name, moa, merge_params(frozen, trainable))


def eval_rows(split, items_per_domain: int) -> np.ndarray:
    """The first `items_per_domain` rows of every domain of a TokenizedSplit (deterministic)."""
    return np.concatenate([split.domain_rows(d)[:items_per_domain] for d in range(len(split.domains))])


def score_completion(domain: str, completion: str, example: dict) -> float:
    """Verifier score for the embedded tasks; normalised exact match against the reference elsewhere."""
    from moa_jax.data import tasks
    answer = tasks.extract_answer(completion)
    if domain in tasks.DOMAIN_NAMES and "metadata" in example:
        return tasks.score(domain, answer, example)
    return float(" ".join(answer.lower().split()) == " ".join(reference_text(example).lower().split()))


def reference_text(example: dict) -> str:
    if "answer" in example:
        return str(example["answer"])
    return next(m["content"] for m in reversed(example["messages"]) if m["role"] == "assistant")


def evaluate_all(ctx: ExperimentContext, trained: dict, progress: bool = True) -> dict:
    """Every method in EvalConfig.methods on the first items_per_domain test items of every domain."""
    from moa_jax.data.pipeline import bucket_for, collate
    from moa_jax.evaluate import generate_answers, perplexity_and_routing
    from moa_jax.api import _eos_ids
    ev, split = ctx.exp.eval, ctx.data["test"]
    rows = eval_rows(split, ev.items_per_domain)
    batches = []
    for s in range(0, len(rows), ev.batch_size):
        chunk = rows[s:s + ev.batch_size]
        valid = np.ones(ev.batch_size, np.int32)
        valid[len(chunk):] = 0
        padded = np.concatenate([chunk, np.repeat(chunk[:1], ev.batch_size - len(chunk))])
        batches.append(collate(split, padded, bucket_for(int(split.lengths[padded].max()), ctx.exp.data.buckets),
                               valid))
    prompts = [split.tokens(r)[:split.prompt_len[r]] for r in rows]
    labels = split.domain[rows]
    examples = [split.example(r) for r in rows]
    results = {"domains": list(ctx.domains), "items_per_domain": [int((labels == d).sum())
                                                                  for d in range(len(ctx.domains))],
               "methods": {}}
    for name in ev.methods:
        t0 = time.perf_counter()
        method = method_params(ctx, trained, name)
        ppl = perplexity_and_routing(ctx.cfg, method, batches, len(ctx.domains))
        texts, experts = generate_answers(
            ctx.cfg, method, prompts, labels, pad_id=split.pad_id, eos_ids=_eos_ids(ctx.tokenizer),
            max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
            decode=lambda ids: ctx.tokenizer.decode(ids, skip_special_tokens=True))
        scores = np.asarray([score_completion(ctx.domains[d], t, ex) for d, t, ex in zip(labels, texts, examples)])
        per_domain = {}
        for d, dname in enumerate(ctx.domains):
            sel = labels == d
            per_domain[dname] = {"accuracy": float(np.mean(scores[sel] >= 1.0)), "score": float(np.mean(scores[sel])),
                                 "ppl": float(ppl["ppl"][d]), "nll": float(ppl["nll"][d])}
            if name == "moa_router":
                per_domain[dname]["routing_accuracy"] = float(np.mean(experts[sel] == d))
        entry = {"per_domain": per_domain, "seconds": time.perf_counter() - t0,
                 "samples": [{"domain": ctx.domains[labels[i]], "completion": texts[i],
                              "reference": reference_text(examples[i])} for i in range(0, len(rows),
                                                                                         max(1, len(rows) // 20))]}
        if ppl["confusion"] is not None:
            entry["confusion"] = ppl["confusion"].tolist()
        for metric in ("accuracy", "ppl"):
            entry[f"mean_{metric}"] = float(np.mean([v[metric] for v in per_domain.values()]))
        if name == "moa_router":
            entry["mean_routing_accuracy"] = float(np.mean(experts == labels))
        results["methods"][name] = entry
        log.info("eval %-12s accuracy %.3f  ppl %.3f  (%.0fs)", name, entry["mean_accuracy"], entry["mean_ppl"],
                 entry["seconds"])
    return results


def run_experiment(exp: ExperimentConfig, workdir: str, progress: bool = True) -> dict:
    """The whole experiment; returns (and writes) the results dict."""
    t0 = time.perf_counter()
    ctx = prepare(exp, workdir)
    trained = train_all(ctx, progress)
    results = evaluate_all(ctx, trained, progress)
    results["experiment"] = exp.name
    results["runtime_seconds"] = time.perf_counter() - t0
    results["backend"] = jax.default_backend()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results
