"""Same-domain sequence packing (DataConfig.packing='domain'): the packed row stream, the packed batches, and the
model and loss on packed rows against the same examples one per row."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.config import ConfigError, DataConfig, ExperimentConfig, TrainConfig
from moa_jax.data import TrainBatches, collate, load_split
from moa_jax.data.packing import PackedRows, collate_packed
from moa_jax.nn.model import MoATransformer, segment_positions
from moa_jax.params import merge_params
from moa_jax.train.step import loss_fn
from tests.data_helpers import make_jsonl_dir, tiny_tokenizer
from tests.train_helpers import init_trees, tiny_cfg, tiny_moa


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three JSONL domains of unequal size (60/24/11 examples), rows packed up to 256 tokens."""
    root = make_jsonl_dir(tmp_path_factory.mktemp("jsonl"), n_per_domain=(60, 24, 11))
    cfg = DataConfig(source=f"jsonl:{root}", holdout_fraction=0.0, max_len=128, buckets=(64, 128, 256), batch_size=6,
                     seed=3, packing="domain", max_segments=4)
    return cfg, load_split(cfg, tiny_tokenizer(vocab_size=300), "train")


def test_packed_rows_cover_the_stream_in_order_within_capacity():
    lengths = np.array([5, 9, 3, 7, 7, 2, 10, 1, 4, 6])
    stream = lambda i: (3 * i + 1) % len(lengths)      # an infinite stream of example ids
    rows = PackedRows(stream, lengths, capacity=12, max_segments=3)
    first = [rows(k) for k in range(20)]
    assert np.array_equal(np.concatenate(first), [stream(i) for i in range(sum(len(r) for r in first))])
    for r in first:
        assert 1 <= len(r) <= 3 and (len(r) == 1 or lengths[r].sum() <= 12)
    fresh = PackedRows(stream, lengths, capacity=12, max_segments=3)
    assert all(np.array_equal(fresh(k), first[k]) for k in (17, 3, 0, 19))   # random access: what resume needs
    total = sum(len(r) for r in first[:7])
    assert 1.0 < PackedRows(stream, lengths, 12, 3).mean_examples_per_row(total) == total / 7


def test_packed_batches(setup):
    cfg, data = setup
    src, again = TrainBatches(data, cfg), TrainBatches(data, cfg)
    seen = np.zeros(len(data.domains))
    for s in range(40):
        b = src.batch(s)
        assert all(np.array_equal(b[k], again.batch(s)[k]) for k in b)
        seg, valid = b["segment_ids"], b["segment_valid"]
        assert seg.shape == b["tokens"].shape and valid.shape == (6, 4) and b["tokens"].shape[1] in cfg.buckets
        assert np.array_equal(seg > 0, b["attention_mask"] > 0)
        assert np.array_equal(valid.sum(1), seg.max(1))
        for i in range(6):
            for g in range(1, valid[i].sum() + 1):   # each segment: a whole example of the row's domain
                at = seg[i] == g
                ids = b["tokens"][i][at]
                matches = [r for r in data.domain_rows(b["domain"][i]) if np.array_equal(data.tokens(r), ids)]
                assert matches, (s, i, g)
                r = matches[0]
                assert b["prompt_mask"][i][at].sum() == data.prompt_len[r]
                assert b["loss_mask"][i][at].sum() == len(ids) - data.prompt_len[r]
            seen[b["domain"][i]] += valid[i].sum()
    assert np.allclose(seen / seen.sum(), 1 / 3, atol=0.06)   # uniform mixing counts examples, not rows
    assert src.examples_per_row > 1.2
    hosts = [TrainBatches(data, cfg, process_index=p, process_count=2).batch(5) for p in range(2)]
    whole = src.batch(5)
    assert all(np.array_equal(np.concatenate([h[k] for h in hosts]), whole[k]) for k in whole)


def test_config_refuses_packing_with_per_row_router_decisions():
    with pytest.raises(ConfigError, match="data.packing='domain' with stage2.train_routing='router'"):
        ExperimentConfig(data=DataConfig(packing="domain"), stage2=TrainConfig(stage="stage2", train_routing="router"))
    with pytest.raises(ConfigError, match="DataConfig.packing"):
        DataConfig(packing="yes")


def _examples(seed=0, lengths=(9, 6, 12, 7), prompt=(5, 3, 8, 4), vocab=64):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, vocab, n).astype(np.int32), p) for n, p in zip(lengths, prompt)]


def _packed_and_single(examples, domain=1):
    """One packed row [1, T] holding every example, and the same examples one per row [n, T]."""
    t = 40
    packed = {k: np.zeros((1, t), np.int32) for k in ("tokens", "loss_mask", "prompt_mask", "attention_mask",
                                                       "segment_ids")}
    single = {k: np.zeros((len(examples), t), np.int32) for k in packed if k != "segment_ids"}
    off = 0
    for g, (ids, p) in enumerate(examples):
        n = len(ids)
        for dst, row, start in ((packed, 0, off), (single, g, 0)):
            dst["tokens"][row, start:start + n] = ids
            dst["attention_mask"][row, start:start + n] = 1
            dst["prompt_mask"][row, start:start + p] = 1
            dst["loss_mask"][row, start + p:start + n] = 1
        packed["segment_ids"][0, off:off + n] = g + 1
        off += n
    packed.update(segment_valid=np.ones((1, len(examples) + 1), np.int32), domain=np.array([domain], np.int32),
                  valid=np.ones(1, np.int32))
    packed["segment_valid"][0, -1] = 0      # one unused segment slot: G > segments in the row
    single.update(domain=np.full(len(examples), domain, np.int32), valid=np.ones(len(examples), np.int32))
    return packed, single


def test_segment_positions():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("routing", ["fixed", "probe", "token"])
def test_packed_row_equals_examples_one_per_row(routing):
    """Per-token NLL and per-segment router logits of a packed row = those of each example alone (f32)."""
    cfg, moa = tiny_cfg(), dataclasses.replace(tiny_moa(num_experts=3), top_k=2)
    frozen, trainable = init_trees(cfg, moa)
    params = {"params": merge_params(frozen, trainable)}
    model = MoATransformer(cfg, moa)
    examples = _examples()
    packed, single = _packed_and_single(examples)

    def run(b, **extra):
        idx = b["domain"] if routing == "fixed" else None
        logits, aux = model.apply(params, b["tokens"], attention_mask=b["attention_mask"],
                                  prompt_mask=b["prompt_mask"], routing=routing, expert_idx=idx, **extra)
        return np.asarray(jax.nn.log_softmax(logits, -1)), np.asarray(aux["router_logits"])

    lp_packed, r_packed = run(packed, segment_ids=packed["segment_ids"], num_segments=5)
    lp_single, r_single = run(single)
    assert r_packed.shape == (cfg.num_layers, 1, 5, moa.num_experts)
    off = 0
    for g, (ids, p) in enumerate(examples):
        n = len(ids)
        np.testing.assert_allclose(lp_packed[0, off:off + n], lp_single[g, :n], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(r_packed[:, 0, g], r_single[:, g], atol=2e-5, rtol=1e-5)
        off += n
    assert np.all(r_packed[:, 0, len(examples)] == 0)   # the unused segment slot pools to zeros


@pytest.mark.parametrize("route_on", ["adapted", "probe"])
def test_stage2_loss_and_gradients_on_packed_rows_equal_unpacked(route_on):
    """The stage-2 objective (per-domain mean token loss + router CE per routed prompt) and its gradients on
    one packed row equal those on the same examples one per row."""
    cfg = tiny_cfg()
    moa = dataclasses.replace(tiny_moa(num_experts=3), route_on=route_on)
    frozen, trainable = init_trees(cfg, moa, seed=1)
    tcfg = TrainConfig(stage="stage2", steps=1, eta=1.0)
    packed, single = _packed_and_single(_examples(seed=2))
    model = MoATransformer(cfg, moa)

    @jax.jit   # one program per row layout (eager, op by op, it took 42 s)
    def value_and_grad(b):
        f = lambda tr: loss_fn(tr, frozen, b, jax.random.PRNGKey(0), model=model, tcfg=tcfg, num_domains=3)
        return jax.value_and_grad(f, has_aux=True)(trainable)

    packed, single = ({k: jnp.asarray(v) for k, v in b.items()} for b in (packed, single))

    (loss_p, m_p), g_p = value_and_grad(packed)
    (loss_s, m_s), g_s = value_and_grad(single)
    np.testing.assert_allclose(loss_p, loss_s, rtol=1e-5)
    np.testing.assert_allclose(m_p["router_loss"], m_s["router_loss"], rtol=1e-5)
    assert float(m_p["examples"]) == float(m_s["examples"]) == 4.0
    for a, b in zip(jax.tree_util.tree_leaves(g_p), jax.tree_util.tree_leaves(g_s)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=2e-4)


def test_collate_lays_out_each_example_and_masks_invalid_rows(setup):
    """collate (one example a row, built on collate_packed): tokens then padding, prompt / response / attention
    masks by position; a row with valid 0 is all padding; collate_packed marks the example as segment 1."""
    cfg, data = setup
    rows = np.array([0, 5, 70])
    out = collate(data, rows, 128, valid=np.array([1, 1, 0]))
    for i, r in enumerate(rows[:2]):
        ids, p = data.tokens(r), int(data.prompt_len[r])
        n = len(ids)
        assert np.array_equal(out["tokens"][i, :n], ids) and (out["tokens"][i, n:] == data.pad_id).all()
        assert out["attention_mask"][i].tolist() == [1] * n + [0] * (128 - n)
        assert out["prompt_mask"][i].tolist() == [1] * p + [0] * (128 - p)
        assert out["loss_mask"][i].tolist() == [0] * p + [1] * (n - p) + [0] * (128 - n)
    assert (out["tokens"][2] == data.pad_id).all() and not out["attention_mask"][2].any()
    assert not out["loss_mask"][2].any() and not out["prompt_mask"][2].any()
    assert out["domain"].tolist() == data.domain[rows].tolist() and out["index"].tolist() == rows.tolist()
    assert out["valid"].tolist() == [1, 1, 0] and "segment_ids" not in out
    packed = collate_packed(data, [rows[i:i + 1] for i in range(3)], 128, max_segments=2)
    assert np.array_equal(packed["segment_ids"], packed["attention_mask"])
    assert packed["segment_valid"].tolist() == [[1, 0]] * 3


def test_packing_report_and_inspect_flag(setup, tmp_path, capsys, monkeypatch):
    """The inspect tool's packing table agrees with the packer; a pack length below max_len is one error line."""
    from moa_jax.data import inspect as data_inspect
    from moa_jax.data.packing import packing_report
    cfg, data = setup
    report = packing_report(data, 256, max_segments=4)
    alpha = data.domain_rows(0)
    packer = PackedRows(lambda i: int(alpha[i % len(alpha)]), data.lengths, 256, 4)
    assert f"{packer.mean_examples_per_row(len(alpha)):>14.2f}" in report.splitlines()[2]
    assert report.splitlines()[2].startswith("alpha") and "all (uniform mixing)" in report
    root = make_jsonl_dir(tmp_path / "j")
    monkeypatch.setattr(data_inspect, "load_tokenizer", lambda name: tiny_tokenizer(vocab_size=300))
    assert data_inspect.main(["--source", f"jsonl:{root}", "--max-len", "128", "--pack-len", "256",
                              "--examples", "0"]) == 0
    assert "packing='domain' at 256 tokens" in capsys.readouterr().out
    assert data_inspect.main(["--source", f"jsonl:{root}", "--max-len", "128", "--pack-len", "64"]) == 2
    assert "--pack-len 64 is shorter than --max-len 128" in capsys.readouterr().err
