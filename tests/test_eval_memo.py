"""Evaluation shares one-expert-per-item work between methods (moa_jax.eval.suite.ItemMemo): on a tiny random MoA whose
experts and routers are randomised (experts differ, the router sends items to several experts),
  - moa_router then moa_oracle with a memo == each evaluated alone from scratch (NLL, PPL, answers, scores);
  - moa_oracle recomputes exactly the items the router sent to another expert than their label;
  - a second evaluation of the same method recomputes nothing;
  - the evaluation's routing decisions == the experts generate_tokens(routing='router') picks;
  - the memo key: a decision-policy variant shares the main adapters' items, a retrained variant does not.
"""
import numpy as np
import pytest

from moa_jax.config import DataConfig, ModelConfig, MoAConfig
from moa_jax.data import load_split
from moa_jax.eval.evaluate import Method, assign_experts
from moa_jax.eval.suite import ItemMemo, adapters_key, build_eval_set, evaluate_method
from moa_jax.generate.decode import generate_tokens, left_pad
from tests.data_helpers import make_jsonl_dir, tiny_tokenizer
from tests.train_helpers import randomised_model

MOA = MoAConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_jsonl_dir(tmp_path_factory.mktemp("jsonl"))
    tok = tiny_tokenizer()
    data = DataConfig(source=f"jsonl:{root}", holdout_fraction=0.0, max_len=128, buckets=(32, 64, 128))
    split = load_split(data, tok, "train")
    es = build_eval_set(split, split.domains, items_per_domain=5, batch_size=4, buckets=data.buckets)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, name="tiny-memo-test")
    params = randomised_model(cfg, MOA, router_scale=3.0)
    kw = dict(pad_id=split.pad_id, eos_ids=(tok.eos_token_id,), max_new_tokens=4, batch_size=4,
              decode=lambda ids: " ".join(map(str, ids)))
    return cfg, es, params, kw


def _strip(entry):
    return {k: v for k, v in entry.items() if k not in ("seconds", "items_computed", "kind", "label")}


def test_memo_shares_items_and_changes_nothing(setup):
    cfg, es, params, kw = setup
    router, oracle = Method("moa_router", MOA, params), Method("moa_oracle", MOA, params)
    chosen = assign_experts(cfg, router, es.prompts, es.labels, pad_id=kw["pad_id"], batch_size=4)
    wrong = int((chosen != es.labels).sum())
    assert 0 < wrong < len(chosen) and len(set(chosen.tolist())) >= 2, f"vacuous routing {chosen} vs {es.labels}"

    memo = ItemMemo()
    r_memo = evaluate_method(cfg, es, router, memo=memo, memo_key="moa", **kw)
    o_memo = evaluate_method(cfg, es, oracle, memo=memo, memo_key="moa", **kw)
    assert r_memo["items_computed"] == len(chosen)
    assert o_memo["items_computed"] == wrong
    again = evaluate_method(cfg, es, oracle, memo=memo, memo_key="moa", **kw)
    assert again["items_computed"] == 0

    r_alone = evaluate_method(cfg, es, router, **kw)
    o_alone = evaluate_method(cfg, es, oracle, **kw)
    for shared, alone in ((r_memo, r_alone), (o_memo, o_alone), (again, o_alone)):
        a, b = _strip(shared), _strip(alone)
        assert a["samples"] == b["samples"]
        for d, row in a["per_domain"].items():
            for metric, value in row.items():
                assert value == pytest.approx(b["per_domain"][d][metric], rel=1e-5, abs=1e-6), (d, metric)
    # the two methods really differ on the re-routed items (otherwise sharing proves nothing)
    assert any(r_alone["per_domain"][d]["nll"] != o_alone["per_domain"][d]["nll"] for d in es.domains)
    assert np.asarray(r_memo["confusion"]).trace() == len(chosen) - wrong


def test_evaluation_routes_like_generation(setup):
    cfg, es, params, kw = setup
    router = Method("moa_router", MOA, params)
    chosen = assign_experts(cfg, router, es.prompts, es.labels, pad_id=kw["pad_id"], batch_size=4)
    tokens, mask = left_pad(es.prompts, kw["pad_id"])
    _, generated, _ = generate_tokens(cfg, MOA, params, tokens, mask, routing="router", max_new_tokens=1,
                                      eos_ids=kw["eos_ids"])
    np.testing.assert_array_equal(chosen, generated)
    oracle = Method("moa_oracle", MOA, params)
    np.testing.assert_array_equal(assign_experts(cfg, oracle, es.prompts, es.labels, pad_id=0, batch_size=4),
                                  es.labels)


def test_adapters_key_shares_only_identical_adapters(setup):
    _, _, params, _ = setup
    vote = MoAConfig(**{**MOA.__dict__, "decision": "vote"})
    main = adapters_key(Method("moa_router", MOA, params))
    assert adapters_key(Method("moa_oracle", MOA, params)) == main
    assert adapters_key(Method("moa_router", vote, params, "moa_router[vote]", key="moa")) == main
    assert adapters_key(Method("moa_router", MOA, params, "moa_router[eta0]", key="moa[eta0]")) != main
    assert adapters_key(Method("single_lora", MOA, params)) != main
    assert adapters_key(Method("base", None, params)) == ("base",)


def test_progress_counts_every_item_once_computed_or_shared(setup):
    """evaluate_method's on_items reports N items per method: batches it generates plus the items the memo gave."""
    cfg, es, params, kw = setup
    memo, n = ItemMemo(), len(es.rows)
    for name in ("moa_router", "moa_oracle"):
        counts = []
        entry = evaluate_method(cfg, es, Method(name, MOA, params), memo=memo, memo_key="moa", on_items=counts.append,
                                **kw)
        assert sum(counts) == n, (name, counts)
        assert len(counts) == -(-entry["items_computed"] // kw["batch_size"]) + (entry["items_computed"] < n)
