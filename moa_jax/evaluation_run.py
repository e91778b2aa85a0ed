"""The evaluation stage of an experiment: every method (and ablation variant) on the same test items of every domain.

Per method and domain (moa_jax.evaluate computes PPL and generates; moa_jax.metrics scores):
  accuracy        share of items whose greedy answer the domain's verifier gives full marks (exact)
  score           mean verifier score (some verifiers give partial credit)
  ppl, nll        perplexity / mean NLL on the response tokens (teacher forcing; routed as the method routes)
  bleu, rouge_l   mean sentence BLEU-4 and ROUGE-L F of the completion against the reference answer (0-100);
  corpus_bleu     pooled-count BLEU-4 of the domain's completions
  routing_accuracy  (router-routed MoA methods) share of items routed to the domain's own expert
Averages are unweighted means over domains (`mean_<metric>`). The `most_common` baseline answers every test item
of a domain with the domain's most common TRAIN answer (no model, no PPL): the floor any method must beat.

Shape glossary: N test items (items_per_domain per domain, domain by domain), D domains, E experts.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from moa_jax import metrics
from moa_jax.config import MoAConfig
from moa_jax.evaluate import Method, generate_answers, perplexity_and_routing
from moa_jax.params import merge_params

log = logging.getLogger("moa_jax")
# trained-tree key (experiment.train_all) of each method that has parameters
TRAINED_KEY = {"single_lora": "single_lora", "mixed_lora": "mixed_lora", "moa_router": "moa", "moa_oracle": "moa",
               "moe_lora": "moe_lora"}
SAMPLES_PER_METHOD = 20


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method to evaluate: `name` (its routing), the `trained` key of its parameters, the MoAConfig to use (None:
    the trained one; an ablation of the decision policy passes its own) and the label the report shows."""
    name: str
    key: Optional[str] = None
    moa: Optional[MoAConfig] = None
    label: str = ""

    @property
    def display(self) -> str:
        return self.label or self.name


def build_method(frozen: Any, trained: dict, spec: MethodSpec) -> Method:
    """-> evaluate.Method (frozen base merged with the method's adapters)."""
    if spec.name == "base":
        return Method("base", None, frozen, spec.label)
    moa, trainable = trained[spec.key or TRAINED_KEY[spec.name]]
    return Method(spec.name, spec.moa or moa, merge_params(frozen, trainable), spec.label)


def eval_rows(split, items_per_domain: int) -> np.ndarray:
    """The first `items_per_domain` rows of every domain of a TokenizedSplit (deterministic)."""
    return np.concatenate([split.domain_rows(d)[:items_per_domain] for d in range(len(split.domains))])


def score_completion(domain: str, completion: str, example: dict) -> float:
    """Verifier score for the embedded tasks; normalised exact match against the reference elsewhere."""
    from moa_jax.data import tasks
    answer = tasks.extract_answer(completion)
    if domain in tasks.DOMAIN_NAMES and example.get("metadata"):
        return tasks.score(domain, answer, example)
    return float(" ".join(answer.lower().split()) == " ".join(reference_text(example).lower().split()))


def reference_text(example: dict) -> str:
    if example.get("answer"):
        return str(example["answer"])
    if "response" in example:
        return str(example["response"])
    return next(m["content"] for m in reversed(example["messages"]) if m["role"] == "assistant")


@dataclasses.dataclass
class EvalSet:
    """The test items every method sees: PPL batches (right-padded, fixed batch size) and generation prompts."""
    domains: tuple
    rows: np.ndarray          # [N] rows of the test TokenizedSplit
    labels: np.ndarray        # [N] domain ids
    batches: list             # PPL batches
    prompts: list             # [N] prompt token lists (chat template, the training system prompt)
    examples: list            # [N] raw examples (verifier metadata)
    references: list          # [N] reference answers

    def per_domain_counts(self) -> list[int]:
        return [int((self.labels == d).sum()) for d in range(len(self.domains))]


def build_eval_set(split, domains: tuple, items_per_domain: int, batch_size: int, buckets: Sequence[int]) -> EvalSet:
    from moa_jax.data.pipeline import bucket_for, collate
    rows = eval_rows(split, items_per_domain)
    batches = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        valid = np.ones(batch_size, np.int32)
        valid[len(chunk):] = 0
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk))])
        batches.append(collate(split, padded, bucket_for(int(split.lengths[padded].max()), buckets), valid))
    examples = [split.example(r) for r in rows]
    return EvalSet(tuple(domains), rows, split.domain[rows], batches,
                   [list(split.tokens(r)[:split.prompt_len[r]]) for r in rows], examples,
                   [reference_text(e) for e in examples])


def score_texts(es: EvalSet, texts: Sequence[str]) -> dict[str, dict]:
    """Verifier accuracy/score, BLEU-4 and ROUGE-L per domain of completions `texts` [N]."""
    scores = np.asarray([score_completion(es.domains[d], t, ex) for d, t, ex in zip(es.labels, texts, es.examples)])
    bleu = np.asarray([metrics.sentence_bleu(t.strip(), r) for t, r in zip(texts, es.references)])
    rouge = np.asarray([metrics.rouge_l(t.strip(), r) for t, r in zip(texts, es.references)])
    out = {}
    for d, name in enumerate(es.domains):
        sel = np.flatnonzero(es.labels == d)
        out[name] = {"accuracy": float(np.mean(scores[sel] >= 1.0)), "score": float(np.mean(scores[sel])),
                     "bleu": float(np.mean(bleu[sel])), "rouge_l": float(np.mean(rouge[sel])),
                     "corpus_bleu": metrics.corpus_bleu([texts[i].strip() for i in sel],
                                                        [es.references[i] for i in sel])}
    return out


def _entry(es: EvalSet, kind: str, label: str, per_domain: dict, texts: Sequence[str], seconds: float) -> dict:
    step = max(1, len(texts) // SAMPLES_PER_METHOD)
    entry = {"kind": kind, "label": label, "per_domain": per_domain, "seconds": seconds,
             "samples": [{"domain": es.domains[es.labels[i]], "completion": texts[i], "reference": es.references[i]}
                         for i in range(0, len(texts), step)]}
    for metric in ("accuracy", "score", "ppl", "bleu", "rouge_l", "routing_accuracy"):
        entry[f"mean_{metric}"] = metrics.domain_mean(per_domain, metric)
    return entry


def most_common_entry(es: EvalSet, train_split) -> dict:
    """The most-common-train-answer baseline: each domain's most common TRAIN answer as the answer to every test
    item of that domain, scored like a completion."""
    t0 = time.perf_counter()
    answers = {name: metrics.most_common_answer(reference_text(e) for e in train_split.text.examples[name])
               for name in es.domains}
    texts = [answers[es.domains[d]] for d in es.labels]
    per_domain = score_texts(es, texts)
    for row in per_domain.values():
        row["ppl"] = row["nll"] = None
    entry = _entry(es, "most_common", "most_common", per_domain, texts, time.perf_counter() - t0)
    entry["answers"] = answers
    return entry


def evaluate_method(cfg, es: EvalSet, method: Method, *, pad_id: int, eos_ids, max_new_tokens: int,
                    batch_size: int, decode) -> dict:
    """PPL + greedy generation + scores (+ routing for router-routed top-1 MoA) of one method."""
    t0 = time.perf_counter()
    n_dom = len(es.domains)
    ppl = perplexity_and_routing(cfg, method, es.batches, n_dom)
    texts, experts = generate_answers(cfg, method, es.prompts, es.labels, pad_id=pad_id, eos_ids=eos_ids,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size, decode=decode)
    per_domain = score_texts(es, texts)
    for d, name in enumerate(es.domains):
        per_domain[name].update(ppl=float(ppl["ppl"][d]), nll=float(ppl["nll"][d]))
    confusion = None
    if method.routing == "router" and method.moa is not None and method.moa.dispatch == "top1":
        confusion = metrics.confusion_matrix(es.labels, experts, n_dom, method.moa.num_experts)
        for name, acc in zip(es.domains, metrics.routing_accuracy(confusion)):
            per_domain[name]["routing_accuracy"] = float(acc)
    entry = _entry(es, method.name, method.display, per_domain, texts, time.perf_counter() - t0)
    if confusion is not None:
        entry["confusion"] = confusion.tolist()
    return entry


def evaluate_all(ctx, trained: dict, specs: Sequence[MethodSpec]) -> dict:
    """Every method spec on the first items_per_domain test items of every domain. -> results dict."""
    from moa_jax.api import _eos_ids
    ev, split = ctx.exp.eval, ctx.data["test"]
    es = build_eval_set(split, ctx.domains, ev.items_per_domain, ev.batch_size, ctx.exp.data.buckets)
    frozen = jax.device_get(ctx.frozen) if jax.process_count() == 1 else ctx.frozen
    results = {"domains": list(ctx.domains), "items_per_domain": es.per_domain_counts(), "methods": {}}
    for spec in specs:
        if spec.name == "most_common":
            entry = most_common_entry(es, ctx.data["train"])
        else:
            entry = evaluate_method(
                ctx.cfg, es, build_method(frozen, trained, spec), pad_id=split.pad_id,
                eos_ids=_eos_ids(ctx.tokenizer), max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                decode=lambda ids: ctx.tokenizer.decode(ids, skip_special_tokens=True))
        results["methods"][spec.display] = entry
        log.info("eval %-22s accuracy %.3f  ppl %s  bleu %.1f  rouge-l %.1f  (%.0fs)", spec.display,
                 entry["mean_accuracy"], _fmt(entry["mean_ppl"]), entry["mean_bleu"], entry["mean_rouge_l"],
                 entry["seconds"])
    return results


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"
