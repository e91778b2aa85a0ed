"""Metric functions against hand-computed values; the report's completeness check and its MoA-vs-baseline
comparison on synthetic results; ablation variant specs and which variants share training. No model runs here."""
import copy
import json
import math

import numpy as np
import pytest

from moa_jax.eval import metrics, report
from moa_jax.config import ConfigError, ExperimentConfig, parse_variant, replace


# ---- BLEU-4 -------------------------------------------------------------------------------------------------------
def test_sentence_bleu_hand_computed():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (6 tokens each, brevity penalty 1):
    # 1-grams 5/6, 2-grams 3/5 (the cat, cat sat, sat on), 3-grams 2/4, 4-grams 1/3 (the cat sat on)
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.sentence_bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(expected)
    assert metrics.sentence_bleu("the cat sat on a mat", "the cat sat on a mat") == pytest.approx(100.0)
    # effective order: a one-word answer equal to a one-word reference is a perfect match ...
    assert metrics.sentence_bleu("42", "42") == pytest.approx(100.0)
    # ... and no shared word is 0; so is an empty completion
    assert metrics.sentence_bleu("41", "42") == 0.0
    assert metrics.sentence_bleu("", "42") == 0.0


def test_sentence_bleu_brevity_penalty():
    # hyp "the cat" vs ref "the cat sat on a mat": precisions 2/2 and 1/1 (effective order 2), BP = exp(1 - 6/2)
    assert metrics.sentence_bleu("the cat", "the cat sat on a mat") == pytest.approx(100 * math.exp(1 - 6 / 2))


def test_corpus_bleu_pools_counts():
    # item 1 as above; item 2 "a b" == "a b": pooled 1-grams 7/8, 2-grams 4/6, 3-grams 2/4, 4-grams 1/3
    hyps, refs = ["the cat sat on the mat", "a b"], ["the cat sat on a mat", "a b"]
    expected = 100 * (7 / 8 * 4 / 6 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.corpus_bleu(hyps, refs) == pytest.approx(expected)
    # one-word answers only: effective order 1 -> BLEU = unigram precision (plain BLEU-4 would be 0)
    assert metrics.corpus_bleu(["42", "Yes"], ["42", "No"]) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics.corpus_bleu(["a", "b"], ["a"])


# ---- ROUGE-L ------------------------------------------------------------------------------------------------------
def test_rouge_l_hand_computed():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = "the cat on the mat" (5): P = R = 5/6
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(100 * 5 / 6)
    # hyp [a b c d] vs ref [a c] (lower-cased): LCS 2, P 2/4, R 2/2, F = 2PR/(P+R) = 2/3
    assert metrics.rouge_l("A B C D", "a c") == pytest.approx(100 * 2 / 3)
    assert metrics.rouge_l("-5", "5") == pytest.approx(100.0)   # punctuation is a separator
    assert metrics.rouge_l("", "5") == 0.0
    assert metrics.rouge_l("x y", "5") == 0.0


# ---- routing -------------------------------------------------------------------------------------------------------
def test_confusion_matrix_and_routing_accuracy():
    conf = metrics.confusion_matrix([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 0, 2, 2], num_domains=3, num_experts=4)
    np.testing.assert_array_equal(conf, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0]])
    np.testing.assert_allclose(metrics.routing_accuracy(conf), [0.5, 1.0, 2 / 3])
    empty_row = metrics.routing_accuracy(np.array([[1, 0], [0, 0]]))
    assert empty_row[0] == 1.0 and np.isnan(empty_row[1])
    with pytest.raises(ValueError, match="out of range"):
        metrics.confusion_matrix([0, 3], [0, 0], num_domains=3)


# ---- baselines and aggregation -------------------------------------------------------------------------------------
def test_most_common_answer_ties_go_to_the_first_seen():
    assert metrics.most_common_answer(["b", "a", "a", "c"]) == "a"
    assert metrics.most_common_answer(["b", "a", "a", "b", "c"]) == "b"
    with pytest.raises(ValueError):
        metrics.most_common_answer([])


def test_domain_mean_and_compare():
    per = {"x": {"acc": 1.0, "ppl": None}, "y": {"acc": 0.5, "ppl": None}, "z": {"acc": 0.0, "ppl": None}}
    assert metrics.domain_mean(per, "acc") == pytest.approx(0.5)
    assert metrics.domain_mean(per, "ppl") is None
    ours = {"x": {"ppl": 2.0}, "y": {"ppl": 3.0}, "z": {"ppl": 4.0}}
    theirs = {"x": {"ppl": 2.5}, "y": {"ppl": 3.0}, "z": {"ppl": 3.5}}
    assert metrics.compare_per_domain(ours, theirs, "ppl", higher_is_better=False) == {
        "wins": ["x"], "ties": ["y"], "losses": ["z"]}
    assert metrics.compare_per_domain(ours, theirs, "ppl", higher_is_better=True) == {
        "wins": ["z"], "ties": ["y"], "losses": ["x"]}
    assert metrics.compare_per_domain(per, per, "ppl") is None


# ---- report on synthetic results -----------------------------------------------------------------------------------
DOMAINS = ["alpha", "beta", "gamma"]


def _entry(acc, ppl=2.0, routing=None):
    per = {d: {"accuracy": a, "score": a, "ppl": ppl, "nll": math.log(ppl) if ppl else None, "bleu": 10.0 * a,
               "rouge_l": 20.0 * a, "corpus_bleu": 10.0 * a} for d, a in zip(DOMAINS, acc)}
    if routing is not None:
        for d, r in zip(DOMAINS, routing):
            per[d]["routing_accuracy"] = r
    e = {"kind": "x", "per_domain": per, "samples": [], "seconds": 0.0}
    for m in ("accuracy", "score", "ppl", "bleu", "rouge_l", "routing_accuracy"):
        e[f"mean_{m}"] = metrics.domain_mean(per, m)
    return e


def _results():
    router = _entry([1.0, 0.5, 0.2], routing=[1.0, 1.0, 0.5])
    router["confusion"] = [[4, 0, 0], [0, 4, 0], [2, 0, 2]]
    return {"domains": DOMAINS, "items_per_domain": [4, 4, 4], "experiment": "synthetic", "model": "none",
            "methods": {"most_common": _entry([0.25, 0.5, 0.0], ppl=None), "single_lora": _entry([0.5, 0.5, 0.5]),
                        "moa_router": router}}


def test_report_says_where_moa_loses(tmp_path):
    summary = report.write_report(_results(), str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    # vs single_lora: MoA wins alpha, ties beta, loses gamma (accuracy)
    line = "MoA vs single_lora (accuracy): wins 1, ties 1, loses 1: loses on gamma; ties on beta"
    assert line in md and line in summary
    assert "MoA vs most_common (accuracy): wins 2, ties 1, loses 0: loses on none; ties on beta" in md
    assert "| gamma | + . + + | - = - - |" in md          # + MoA better, = tie, - worse, . not measured (PPL)
    assert "| alpha | + . + + | + = + + |" in md
    assert "| moa_router | 0.567 | 2.000 | 5.67 | 11.33 | 0.833 |" in md    # the averages row
    assert "| 2 gamma | 2 | 0 | 2 |" in md                                  # confusion matrix row
    saved = json.loads((tmp_path / "results.json").read_text())
    comp = next(c for c in saved["comparisons"] if c["other"] == "single_lora" and c["metric"] == "accuracy")
    assert (comp["wins"], comp["ties"], comp["losses"]) == (["alpha"], ["beta"], ["gamma"])
    for png in ("accuracy_by_method.png", "router_confusion.png"):
        assert (tmp_path / png).stat().st_size > 5000


def test_report_counts_dropped_items_per_domain_and_split(tmp_path):
    """results.md / results.json say, per domain and split, how many examples the max-length policy dropped or
    truncated and how many test items were evaluated (counts from the real tokenisation of over-long examples)."""
    from moa_jax.config import DataConfig
    from moa_jax.data import load_text_split, tokenize_split
    from moa_jax.eval.suite import data_counts
    from tests.data_helpers import make_jsonl_dir, tiny_tokenizer
    root = make_jsonl_dir(tmp_path / "d", long_every=5)   # 6 of alpha's 30 examples are over-long
    text = load_text_split(DataConfig(source=f"jsonl:{root}", holdout_fraction=0.0), "train")
    data = {split: tokenize_split(text, tiny_tokenizer(), max_len=128, policy="drop") for split in ("train", "test")}
    results = _results()
    results["data"] = data_counts(data, {"alpha": 4, "beta": 4, "gamma": 4})
    summary = report.write_report(results, str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert "## Data: examples per domain and split" in md and "| domain | train | test | evaluated |" in md
    assert "| alpha | 24 of 30 (6 dropped) | 24 of 30 (6 dropped) | 4 |" in md
    assert "| beta | 12 of 12 | 12 of 12 | 4 |" in md
    note = "test split: alpha 24 of 30 (6 dropped) (max_len=128, length_policy=drop)"
    assert note in md and note in summary
    saved = json.loads((tmp_path / "results.json").read_text())["data"]
    assert saved["splits"]["test"]["alpha"] == {"total": 30, "kept": 24, "dropped": 6, "truncated": 0}
    assert saved["evaluated"] == {"alpha": 4, "beta": 4, "gamma": 4}


def test_report_refuses_a_missing_domain(tmp_path):
    results = _results()
    del results["methods"]["single_lora"]["per_domain"]["beta"]
    with pytest.raises(report.ReportError, match=r"method 'single_lora' has no results for domain\(s\) \['beta'\]"):
        report.write_report(results, str(tmp_path))
    results = _results()
    del results["methods"]["moa_router"]["per_domain"]["gamma"]["bleu"]
    with pytest.raises(report.ReportError, match=r"method 'moa_router', domain 'gamma' lacks metric\(s\) \['bleu'\]"):
        report.write_report(results, str(tmp_path))
    assert not (tmp_path / "results.md").exists()


# ---- ablation variants ---------------------------------------------------------------------------------------------
def test_parse_variant():
    v = parse_variant("eta0.1: stage2.eta=0.1; stage2.steps=5; methods=moa_router+moa_oracle")
    assert (v.name, v.sets, v.methods) == ("eta0.1", ("stage2.eta=0.1", "stage2.steps=5"), ("moa_router", "moa_oracle"))
    assert parse_variant("vote:moa.decision=vote;methods=moa_router").methods == ("moa_router",)
    with pytest.raises(ConfigError, match="cannot vary"):   # stage 1 is shared by every variant
        ExperimentConfig(variants=("bad: stage1.steps=3",))
    with pytest.raises(ConfigError, match="cannot vary"):   # a prefix of a variant key is not enough
        ExperimentConfig(variants=("bad: moa.decisions=vote",))
    with pytest.raises(ConfigError, match="methods"):
        parse_variant("bad: methods=base")
    with pytest.raises(ConfigError, match="NAME"):
        parse_variant("no colon")
    with pytest.raises(ConfigError, match="duplicate"):
        ExperimentConfig(variants=("a: stage2.eta=0", "a: stage2.eta=1"))


def test_variants_share_training_where_settings_match():
    from experiments.registry import get_experiment
    from moa_jax.workflows.two_stage import _training_key, plan_variants
    exp = get_experiment("moa_10task_ablations")
    shares_main = {v.name: [_training_key(ve, m) == _training_key(exp, m) for m in v.methods]
                   for v, ve in plan_variants(exp)}
    assert shares_main["vote"] == [True]                   # decision policy: evaluation only
    assert shares_main["moe_lora"] == [True]               # = the experiment's own moe_lora settings
    for name in ("eta0", "eta0.1", "eta10", "random_init", "moe_lora_naive"):
        assert not any(shares_main[name]), name
    keys = {v.name: _training_key(ve, v.methods[0]) for v, ve in plan_variants(exp)}
    assert len(set(keys.values())) == len(keys)              # no two variants train the same thing
    with pytest.raises(ConfigError, match="variant 'x'.*unknown key"):
        plan_variants(replace(exp, variants=("x: stage2.nope=1",)))


def test_config_differences_ignore_logging_only_fields():
    from moa_jax.workflows.context import config_differences
    a = {"experiment": "moa_10task", "train": {"steps": 10, "log_every": 5}, "moa": {"rank": 4, "decision": "last"}}
    b = copy.deepcopy(a)
    b.update(experiment="moa_10task_ablations")
    b["train"]["log_every"] = 1
    b["moa"]["decision"] = "vote"
    assert config_differences(a, b) == []
    b["train"]["steps"] = 20
    assert config_differences(a, b) == ["train.steps: 10 -> 20"]
    # a run saved before a field existed matches a config holding that field's old meaning, and only that
    now = copy.deepcopy(a)
    now["moa"]["route_on"], now["train"]["router_prior"] = "adapted", []
    now["data"] = {"packing": "none", "max_segments": 8}
    assert config_differences(a, now) == []
    now["data"]["packing"] = "domain"
    assert config_differences(a, now) == ["data.packing: 'none' -> 'domain'"]
