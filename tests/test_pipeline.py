"""The batch pipeline: determinism, resume, domain balance, buckets and padding, masks, host sharding, eval pass."""

import numpy as np
import pytest

from moa_jax.config import DataConfig
from moa_jax.data import DataError, TrainBatches, collate_rows, domain_weights, eval_batches, load_split
from tests.data_helpers import make_jsonl_dir, tiny_tokenizer

KEYS = ("tokens", "loss_mask", "prompt_mask", "attention_mask", "domain", "index", "valid")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three JSONL domains of unequal size (60/24/11 examples)."""
    root = make_jsonl_dir(tmp_path_factory.mktemp("jsonl"), n_per_domain=(60, 24, 11))
    cfg = DataConfig(source=f"jsonl:{root}", holdout_fraction=0.0, max_len=128, buckets=(16, 32, 64, 128),
                     batch_size=8, seed=3)
    tok = tiny_tokenizer(vocab_size=300)
    return cfg, tok, load_split(cfg, tok, "train")


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_is_pure_function_of_seed_and_step(setup):
    cfg, tok, data = setup
    it1, it2 = TrainBatches(data, cfg), TrainBatches(data, cfg)
    run = [it1.batch(s) for s in range(12)]
    assert all(same(it2.batch(s), run[s]) for s in reversed(range(12)))   # any order: what resume relies on
    assert set(run[0]) == set(KEYS)
    other = TrainBatches(data, DataConfig(**{**cfg.__dict__, "seed": 4}))
    assert not all(same(b, other.batch(s)) for s, b in enumerate(run))


@pytest.mark.parametrize("mixing", ["uniform", "temperature", "proportional"])
def test_domain_balance(setup, mixing):
    cfg, tok, data = setup
    cfg = DataConfig(**{**cfg.__dict__, "mixing": mixing, "temperature": 2.0})
    counts = np.bincount(data.domain, minlength=3)
    want = domain_weights(counts, mixing, 2.0)
    assert np.allclose(want, {"uniform": np.ones(3) / 3, "proportional": counts / counts.sum(),
                              "temperature": np.sqrt(counts) / np.sqrt(counts).sum()}[mixing])
    it = TrainBatches(data, cfg)
    doms = np.concatenate([it.batch(s)["domain"] for s in range(60)])
    freq = np.bincount(doms, minlength=3) / len(doms)
    assert np.abs(freq - want).max() < 0.02, (freq, want)
    assert all(len(set(it.batch(s)["domain"])) > 1 for s in range(5))  # mixed-domain batches


def test_each_domain_epoch_visits_every_example_once(setup):
    cfg, tok, data = setup
    it = TrainBatches(data, cfg)
    seen = {d: [] for d in range(3)}
    for s in range(60):
        b = it.batch(s)
        for d, i in zip(b["domain"], b["index"]):
            seen[int(d)].append(int(i))
    for d in range(3):
        n = int((data.domain == d).sum())
        first, second = seen[d][:n], seen[d][n:2 * n]
        assert sorted(first) == sorted(second) == list(data.domain_rows(d)) and first != second  # reshuffled


def test_bucket_shapes_padding_and_masks(setup):
    cfg, tok, data = setup
    it = TrainBatches(data, cfg)
    shapes = set()
    for s in range(40):
        b = it.batch(s)
        T = b["tokens"].shape[1]
        shapes.add(T)
        lengths = data.lengths[b["index"]]
        assert T == min(t for t in cfg.buckets if t >= lengths.max())  # smallest bucket that fits
        assert b["tokens"].shape == (8, T) and all(b[k].dtype == np.int32 for k in KEYS)
        for r in range(8):
            n, p = lengths[r], data.prompt_len[b["index"][r]]
            assert b["attention_mask"][r].tolist() == [1] * n + [0] * (T - n)  # right padding
            assert b["prompt_mask"][r].tolist() == [1] * p + [0] * (T - p)  # prompt only: no response, no pad
            assert b["loss_mask"][r].tolist() == [0] * p + [1] * (n - p) + [0] * (T - n)  # response + eos
            assert (b["tokens"][r, n:] == data.pad_id).all() and b["tokens"][r, n - 1] == tok.eos_token_id
            ex = data.example(b["index"][r])
            assert tok.decode(b["tokens"][r][b["loss_mask"][r] == 1]) == ex["response"] + tok.eos_token
    assert shapes <= set(cfg.buckets) and len(shapes) >= 2


def test_micro_batches_share_one_length(setup):
    cfg, tok, data = setup
    it = TrainBatches(data, cfg, micro_batches=4)
    for g in range(6):
        assert len({it.batch(4 * g + a)["tokens"].shape[1] for a in range(4)}) == 1


def test_hosts_read_disjoint_shards_of_the_same_global_batch(setup):
    cfg, tok, data = setup
    single = TrainBatches(data, cfg)
    hosts = [TrainBatches(data, cfg, process_index=p, process_count=2) for p in range(2)]
    for s in range(10):
        parts = [h.batch(s) for h in hosts]
        g = single.batch(s)
        assert all(p["tokens"].shape == (4, g["tokens"].shape[1]) for p in parts)
        for k in KEYS:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), g[k])
    with pytest.raises(DataError, match="not divisible by process_count=3"):
        TrainBatches(data, cfg, process_index=0, process_count=3)


def test_eval_pass_covers_every_example_once_with_valid_mask(setup):
    cfg, tok, data = setup
    n = len(data)
    assert n % 8  # the last batch is partial
    batches = eval_batches(data, cfg)
    rows = [b for b in batches]
    assert len(rows) == -(-n // 8) and all(b["tokens"].shape[0] == 8 for b in rows)
    valid_idx = np.concatenate([b["index"][b["valid"] == 1] for b in rows])
    assert valid_idx.tolist() == list(range(n))
    last = rows[-1]
    pad = last["valid"] == 0
    assert pad.sum() == 8 * len(rows) - n
    assert (last["loss_mask"][pad] == 0).all() and (last["attention_mask"][pad] == 0).all()
    assert all(b["tokens"].shape[1] in cfg.buckets for b in rows)
    assert all(same(a, b) for a, b in zip(rows, eval_batches(data, cfg)))  # deterministic, re-iterable
    # two hosts: each gets half of every batch; together they are the single-host pass
    halves = [list(eval_batches(data, cfg, process_index=p, process_count=2)) for p in range(2)]
    for i, b in enumerate(rows):
        for k in KEYS:
            assert np.array_equal(np.concatenate([halves[0][i][k], halves[1][i][k]]), b[k])


def test_collate_rows_keeps_the_chosen_rows_in_order_and_pads_the_last_batch(setup):
    cfg, tok, data = setup
    rows = np.concatenate([data.domain_rows(d)[:5] for d in range(len(data.domains))])[::-1]   # 15 rows, any order
    batches = collate_rows(data, rows, 4, cfg.buckets)
    assert len(batches) == 4 and all(b["tokens"].shape[0] == 4 for b in batches)
    assert np.concatenate([b["index"][b["valid"] == 1] for b in batches]).tolist() == rows.tolist()
    assert batches[-1]["valid"].tolist() == [1, 1, 1, 0]
    assert (batches[-1]["loss_mask"][3] == 0).all() and (batches[-1]["tokens"][3] == data.pad_id).all()
    for b in batches:   # each batch at the smallest bucket that fits its longest row
        longest = int(data.lengths[b["index"][b["valid"] == 1]].max())
        assert b["tokens"].shape[1] == min(x for x in cfg.buckets if x >= longest)
