"""Evaluation metrics as plain functions on host values: BLEU-4 and ROUGE-L of generated text against a reference,
routing accuracy and the confusion matrix, the most-common-answer baseline, averages over domains and the
per-domain win/tie/loss comparison the report prints.

Text metrics follow the common packages exactly (the tests check hand-computed values):
  BLEU-4   sacrebleu 2.x with its defaults (13a tokenisation, case-sensitive, 'exp' smoothing). `sentence_bleu`
           uses sacrebleu's effective order (orders the hypothesis has no n-grams of are left out), so a one-word
           answer that equals a one-word reference scores 100; `corpus_bleu` pools the n-gram counts of a set of
           items, also with effective order (plain corpus BLEU-4 is 0 for any set of answers shorter than 4 words).
  ROUGE-L  rouge_score's F-measure of the longest common subsequence, with its default tokeniser (lower case,
           every run of characters outside [a-z0-9] is a separator, so '-5' and '5' are the same token).
Scores are on a 0-100 scale, as in the paper's Table 2.

Shape glossary: N items, D domains, E experts.
"""
from __future__ import annotations

import collections
import functools
import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np


# ---- text --------------------------------------------------------------------------------------------------------
def sentence_bleu(hypothesis: str, reference: str) -> float:
    """BLEU-4 of one hypothesis against one reference, 0-100 (sacrebleu sentence BLEU)."""
    return float(_bleu(True).sentence_score(hypothesis, [reference]).score)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """BLEU-4 of N hypotheses against their N references with pooled n-gram counts, 0-100."""
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return float("nan")
    return float(_bleu(True).corpus_score(list(hypotheses), [list(references)]).score)


@functools.lru_cache(maxsize=None)
def _bleu(effective_order: bool):
    from sacrebleu.metrics import BLEU
    return BLEU(effective_order=effective_order)


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure of one hypothesis against one reference, 0-100."""
    return 100.0 * float(_rouge().score(reference, hypothesis)["rougeL"].fmeasure)


@functools.lru_cache(maxsize=None)
def _rouge():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


# ---- routing -----------------------------------------------------------------------------------------------------
def confusion_matrix(labels: Sequence[int], predicted: Sequence[int], num_domains: int,
                     num_experts: Optional[int] = None) -> np.ndarray:
    """[D, E] counts: row = domain label, column = the expert chosen for that item."""
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    num_experts = num_domains if num_experts is None else num_experts
    if labels.shape != predicted.shape:
        raise ValueError(f"confusion_matrix: labels {labels.shape} vs predictions {predicted.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_domains or predicted.min() < 0
                        or predicted.max() >= num_experts):
        raise ValueError(f"confusion_matrix: ids out of range (domains {num_domains}, experts {num_experts})")
    out = np.zeros((num_domains, num_experts), np.int64)
    np.add.at(out, (labels, predicted), 1)
    return out


def routing_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Per-domain share of items routed to their own domain's expert [D] (diagonal / row sum; NaN for an empty row)."""
    confusion = np.asarray(confusion, np.float64)
    rows = confusion.sum(axis=1)
    diag = np.zeros(confusion.shape[0])   # more domains than experts (a domain added since): no own expert, 0
    k = min(confusion.shape)
    diag[:k] = np.diagonal(confusion)[:k]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, diag / np.maximum(rows, 1), np.nan)


def family_routing(confusion: np.ndarray, domains: Sequence[str], families: Mapping[str, str]) -> dict[str, dict]:
    """Routing per family of similar domains (confusion [D, E], expert j = domain j): family -> {domains, items,
    accuracy (share of its items routed to their own domain), within_family (share routed to ANOTHER domain of the
    same family), elsewhere (share routed outside the family)}. Domains without a family are left out."""
    confusion = np.asarray(confusion, np.int64)
    out: dict[str, dict] = {}
    for fam in dict.fromkeys(families[d] for d in domains if families.get(d)):
        members = [i for i, d in enumerate(domains) if families.get(d) == fam]
        inside = [j for j in members if j < confusion.shape[1]]
        items = int(confusion[members].sum())
        own = int(sum(confusion[i, i] for i in members if i < confusion.shape[1]))
        same = int(confusion[np.ix_(members, inside)].sum()) - own
        n = max(items, 1)
        out[fam] = {"domains": len(members), "items": items, "accuracy": own / n, "within_family": same / n,
                    "elsewhere": (items - own - same) / n}
    return out


def worst_confusions(confusion: np.ndarray, domains: Sequence[str], k: int = 10) -> list[dict]:
    """The k largest off-diagonal cells of a confusion [D, E] (expert j = domain j): {domain, routed_to, items,
    share (of the domain's items)}, most items first (ties: larger share, then domain order)."""
    confusion = np.asarray(confusion, np.int64)
    rows = confusion.sum(axis=1)
    cells = [(int(confusion[i, j]), confusion[i, j] / rows[i], i, j) for i in range(confusion.shape[0])
             for j in range(confusion.shape[1]) if i != j and confusion[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], -c[1], c[2], c[3]))
    names = list(domains)
    return [{"domain": names[i], "routed_to": names[j] if j < len(names) else f"expert {j}", "items": n,
             "share": float(share)} for n, share, i, j in cells[:k]]


# ---- baselines and aggregation -----------------------------------------------------------------------------------
def most_common_answer(answers: Iterable[str]) -> str:
    """The most frequent answer; ties go to the one seen first (so the result is a pure function of the order)."""
    counts = collections.Counter(answers)
    if not counts:
        raise ValueError("most_common_answer: no answers")
    return counts.most_common(1)[0][0]   # Counter keeps insertion order among equal counts


def domain_mean(per_domain: Mapping[str, Mapping[str, Optional[float]]], metric: str) -> Optional[float]:
    """Unweighted mean of `metric` over domains (every domain counts the same); None where no domain has it."""
    values = [v.get(metric) for v in per_domain.values()]
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(values)) if values else None


def compare_per_domain(ours: Mapping[str, Mapping], theirs: Mapping[str, Mapping], metric: str,
                       higher_is_better: bool = True, tol: float = 1e-9) -> Optional[dict[str, list[str]]]:
    """Which domains `ours` wins, ties and loses on `metric` against `theirs` (domains where either lacks the metric
    are left out). -> {"wins": [...], "ties": [...], "losses": [...]} or None when no domain has both."""
    out: dict[str, list[str]] = {"wins": [], "ties": [], "losses": []}
    for domain, row in ours.items():
        a, b = row.get(metric), theirs.get(domain, {}).get(metric)
        if a is None or b is None or math.isnan(float(a)) or math.isnan(float(b)):
            continue
        diff = (float(a) - float(b)) * (1.0 if higher_is_better else -1.0)
        out["wins" if diff > tol else "losses" if diff < -tol else "ties"].append(domain)
    return out if any(out.values()) else None
