"""The evaluation stage of an experiment: every method (and ablation variant) on the same test items of every domain.

Per method and domain (moa_jax.eval.evaluate routes, computes NLL and generates per item; moa_jax.eval.metrics scores):
  accuracy        share of items whose greedy answer the domain's verifier gives full marks (exact)
  score           mean verifier score (some verifiers give partial credit)
  ppl, nll        perplexity / mean NLL on the response tokens (teacher forcing; routed as the method routes), over
                  the generation items, or over the first eval.ppl_items_per_domain test items of every domain when
                  that is set (PPL needs no generation, so many more items are cheap; `ppl_items_per_domain` in the
                  results says how many)
  bleu, rouge_l   mean sentence BLEU-4 and ROUGE-L F of the completion against the reference answer (0-100);
  corpus_bleu     pooled-count BLEU-4 of the domain's completions
  routing_accuracy  (methods whose registry record says so: moa_router) share of items routed to the domain's own
                  expert; the entry's `routing_policy` says where the routers read (MoAConfig.route_on) and the
                  decision policy
Averages are unweighted means over domains (`mean_<metric>`). The `most_common` baseline answers every test item
of a domain with the domain's most common TRAIN answer (no model, no PPL): the floor any method must beat.

Every top-1 method runs each item with one expert (the label's, the router's decision, expert 0 of the mixed
LoRA, or none for the base), so an item's NLL and answer depend only on (adapters, item, expert). `ItemMemo` keeps
them: moa_oracle recomputes only the items the router sent elsewhere (none, at 100% routing accuracy), and
ablation variants that share adapters share items. Token-level dispatch (moe_lora) is always computed in full;
soft dispatch cannot be generated from (moa_jax.generate refuses it) and ExperimentConfig refuses it for moa_router.

Shape glossary: N test items (items_per_domain per domain, domain by domain), D domains, E experts.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from moa_jax.config import EvalConfig, ModelConfig
from moa_jax.data import tasks
from moa_jax.data.pipeline import collate_rows
from moa_jax.eval import metrics
from moa_jax.eval.evaluate import BASE, Method, assign_experts, generate_answers, item_nll
from moa_jax.generate.decode import eos_ids, forward_moa

log = logging.getLogger("moa_jax")
SAMPLES_PER_METHOD = 20


def eval_rows(split, items_per_domain: int) -> np.ndarray:
    """The first `items_per_domain` rows of every domain of a TokenizedSplit (deterministic)."""
    return np.concatenate([split.domain_rows(d)[:items_per_domain] for d in range(len(split.domains))])


def score_completion(domain: str, completion: str, example: dict) -> float:
    """Verifier score for the registered reasoning-gym domains (moa_jax/data/tasks.py, the embedded ten and the
    wide registry); normalised exact match against the reference elsewhere."""
    answer = tasks.extract_answer(completion)
    if tasks.has_verifier(domain) and example.get("metadata"):
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
    split: Any = None         # the TokenizedSplit the rows index (to re-collate a subset of items)
    batch_size: int = 1
    buckets: tuple = ()
    ppl: Optional["EvalSet"] = None   # the PPL items when they are not the generation items

    def subset_batches(self, items: np.ndarray) -> list:
        """PPL batches of the items `items` (indices into the N test items, in that order)."""
        if len(items) == len(self.rows) and (np.asarray(items) == np.arange(len(self.rows))).all():
            return self.batches
        return collate_rows(self.split, self.rows[items], self.batch_size, self.buckets)

    @property
    def longest_prompt(self) -> int:
        return max(len(p) for p in self.prompts)

    def per_domain_counts(self) -> list[int]:
        return [int((self.labels == d).sum()) for d in range(len(self.domains))]


def build_eval_set(split, domains: tuple, items_per_domain: int, batch_size: int, buckets: Sequence[int],
                   ppl_items_per_domain: int = 0) -> EvalSet:
    """The first items_per_domain test items of every domain; with ppl_items_per_domain, `.ppl` holds that many
    items per domain for PPL (the same first items, then more)."""
    rows = eval_rows(split, items_per_domain)
    examples = [split.example(r) for r in rows]
    ppl = None
    if ppl_items_per_domain:
        ppl = build_eval_set(split, domains, ppl_items_per_domain, batch_size, buckets)
    return EvalSet(tuple(domains), rows, split.domain[rows], collate_rows(split, rows, batch_size, buckets),
                   [list(split.tokens(r)[:split.prompt_len[r]]) for r in rows], examples,
                   [reference_text(e) for e in examples], split, batch_size, tuple(buckets), ppl)


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


def method_entry(es: EvalSet, kind: str, label: str, per_domain: dict, texts: Sequence[str],
                 seconds: float) -> dict:
    """A method's results entry: per-domain scores, their means and sample completions."""
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
    entry = method_entry(es, "most_common", "most_common", per_domain, texts, time.perf_counter() - t0)
    entry["answers"] = answers
    return entry


class ItemMemo:
    """(adapters key, item, expert) -> (NLL sum, target count, answer text) of one-expert-per-item evaluations."""

    def __init__(self):
        self._items: dict = {}

    def missing(self, key, experts: np.ndarray) -> np.ndarray:
        return np.asarray([i for i, e in enumerate(experts) if (key, i, int(e)) not in self._items], np.int64)

    def put(self, key, items, experts, sums, counts, texts) -> None:
        for i, e, s, c, t in zip(items, experts, sums, counts, texts):
            self._items[(key, int(i), int(e))] = (float(s), float(c), t)

    def get(self, key, experts: np.ndarray):
        """-> (NLL sums [N], counts [N], texts [N]) of items 0..N-1 with their experts."""
        rows = [self._items[(key, i, int(e))] for i, e in enumerate(experts)]
        return (np.asarray([r[0] for r in rows]), np.asarray([r[1] for r in rows]), [r[2] for r in rows])


def evaluate_method(cfg, es: EvalSet, method: Method, *, pad_id: int, eos_ids, max_new_tokens: int,
                    batch_size: int, decode, memo: Optional[ItemMemo] = None, memo_key=None,
                    on_items: Optional[Callable[[int], None]] = None, experts: Optional[np.ndarray] = None) -> dict:
    """NLL + greedy generation + scores (+ routing accuracy and confusion for router-routed top-1 MoA) of one
    method. With a `memo` and a `memo_key` naming the method's adapters, items already evaluated with the same
    adapters and expert are taken from the memo instead of being run again. `on_items(n)` reports progress: n
    more of the N items are done (generated, or taken from the memo). `experts` [N]: the expert of every item,
    chosen outside the model (a peer router, benchmarks/studies/peer_routers.py) for a top-1 method's adapters;
    the entry then has their routing accuracy and confusion (PPL over the generation items only)."""
    t0 = time.perf_counter()
    n_dom, n = len(es.domains), len(es.rows)
    given = experts is not None
    if given:
        if not method.per_item_expert or es.ppl is not None:
            raise ValueError("experts= needs a one-expert-per-item method and PPL over the generation items")
        experts = np.asarray(experts, np.int64)
    else:
        experts = assign_experts(cfg, method, es.prompts, es.labels, pad_id=pad_id, batch_size=batch_size,
                                 names=es.domains)
    share = memo is not None and memo_key is not None and experts is not None
    todo = memo.missing(memo_key, experts) if share else np.arange(n)
    if len(todo):
        sub_experts = None if experts is None else experts[todo]
        sums, counts = item_nll(cfg, method, es.subset_batches(todo), sub_experts)
        texts, _ = generate_answers(cfg, method, [es.prompts[i] for i in todo], sub_experts, pad_id=pad_id,
                                    eos_ids=eos_ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    decode=decode, pad_to=es.longest_prompt, on_batch=on_items)
    if on_items is not None and n > len(todo):
        on_items(n - len(todo))
    if share:
        if len(todo):
            memo.put(memo_key, todo, experts[todo], sums, counts, texts)
        sums, counts, texts = memo.get(memo_key, experts)
    per_domain = score_texts(es, texts)
    if es.ppl is not None:   # PPL over its own items: their experts as the method routes, then one NLL pass
        ppl_experts = assign_experts(cfg, method, es.ppl.prompts, es.ppl.labels, pad_id=pad_id, batch_size=batch_size,
                                     names=es.domains)
        sums, counts = item_nll(cfg, method, es.ppl.batches, ppl_experts)
    labels = es.labels if es.ppl is None else es.ppl.labels
    for d, name in enumerate(es.domains):
        sel = labels == d
        nll = float(sums[sel].sum() / max(counts[sel].sum(), 1.0))
        per_domain[name].update(ppl=float(np.exp(nll)), nll=nll)
    confusion = None
    if (method.info.routing_accuracy or given) and experts is not None:
        routed = experts != BASE   # an abstained item (base fall-back) is in no column, and counts as missed
        confusion = metrics.confusion_matrix(es.labels[routed], experts[routed], n_dom, method.moa.num_experts)
        accuracy = metrics.routing_accuracy(confusion)
        if not routed.all():
            totals = np.asarray(es.per_domain_counts(), np.float64)
            accuracy = np.diag(confusion)[:n_dom] / np.maximum(totals, 1.0)
        for d, (name, acc) in enumerate(zip(es.domains, accuracy)):
            per_domain[name]["routing_accuracy"] = float(acc)
            if not routed.all():
                per_domain[name]["abstained"] = float(np.mean(~routed[es.labels == d]))
    entry = method_entry(es, method.name, method.display, per_domain, texts, time.perf_counter() - t0)
    entry["items_computed"] = int(len(todo))   # the rest came from the memo
    if confusion is not None:
        entry["confusion"] = confusion.tolist()
    if confusion is not None and not given:
        entry["routing_policy"] = {"route_on": method.moa.route_on, "decision": method.moa.decision}
    return entry


def adapters_key(method: Method):
    """What an item's one-expert evaluation depends on besides (item, expert): the adapters, and the adapter
    settings (the decision policy only chooses the expert, so it is left out)."""
    if method.moa is None:
        return ("base",)
    return (method.trained_key, forward_moa(method.moa))


def evaluate_all(cfg: ModelConfig, frozen: Any, tokenizer, data: dict, trained: dict, specs: Sequence[Method], *,
                 ev: EvalConfig, buckets: Sequence[int], progress: bool = True) -> dict:
    """Every method (without parameters: `Method.resolve` takes them from `trained`) on the first
    ev.items_per_domain test items of every domain of `data` (split -> TokenizedSplit), on the base model `cfg` /
    `frozen` (placed as training placed it) with `tokenizer`. -> results dict. `progress`: one bar over methods x
    items (process 0)."""
    split, domains = data["test"], tuple(data["train"].domains)   # expert ids follow the training domains
    es = build_eval_set(split, domains, ev.items_per_domain, ev.batch_size, buckets, ev.ppl_items_per_domain)
    results = {"domains": list(domains), "items_per_domain": es.per_domain_counts(), "methods": {},
               "data": data_counts(data, dict(zip(domains, es.per_domain_counts())))}
    families = {d: tasks.family_of(d) for d in domains}
    if any(families.values()):   # registered reasoning-gym domains: the report groups routing by family
        results["families"] = families
    if es.ppl is not None:
        results["ppl_items_per_domain"] = es.ppl.per_domain_counts()
    memo = ItemMemo()
    bar = tqdm(total=len(specs) * len(es.rows), desc="eval", unit="item", dynamic_ncols=True,
               disable=not (progress and jax.process_index() == 0))
    for spec in specs:
        bar.set_postfix(method=spec.display, refresh=False)
        if spec.routing is None:   # no model: the most common train answer
            entry = most_common_entry(es, data["train"])
            bar.update(len(es.rows))
        else:
            # the base as the caller placed it (device or mesh): a host copy would be re-sent at every call
            method = spec.resolve(frozen, trained)
            entry = evaluate_method(
                cfg, es, method, pad_id=split.pad_id,
                eos_ids=eos_ids(tokenizer), max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                memo=memo, memo_key=adapters_key(method), on_items=bar.update)
        results["methods"][spec.display] = entry
        log.info("eval %-22s accuracy %.3f  ppl %s  bleu %.1f  rouge-l %.1f  (%.0fs%s)", spec.display,
                 entry["mean_accuracy"], _fmt(entry["mean_ppl"]), entry["mean_bleu"], entry["mean_rouge_l"],
                 entry["seconds"], _reuse_note(entry, len(es.rows)))
    bar.close()
    return results


def data_counts(data: dict, evaluated: dict[str, int]) -> dict:
    """What the max-length policy did, per split and domain (examples in the source, kept, dropped, truncated),
    and how many test items each method was evaluated on (at most eval.items_per_domain of the kept ones)."""
    report = next(iter(data.values())).report
    return {"max_len": report.max_len, "length_policy": report.policy, "evaluated": evaluated,
            "splits": {split: {d: {k: r[k] for k in ("total", "kept", "dropped", "truncated")}
                               for d, r in ts.report.rows.items()} for split, ts in data.items()}}


def _reuse_note(entry: dict, n: int) -> str:
    computed = entry.get("items_computed", n)
    return "" if computed == n else f"; {n - computed} of {n} items shared with an earlier method"


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"
