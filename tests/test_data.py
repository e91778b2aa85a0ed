"""Data sources, the embedded tfds builder, tokenisation/masks, the max-length policy and bad-input errors."""
import importlib.util
import json
import logging
import os
import sys

import numpy as np
import pytest

from moa_jax.config import ConfigError, DataConfig
from moa_jax.data import (DOMAIN_NAMES, TASK_SYSTEM_PROMPT, DataError, extract_answer, is_correct, load_split,
                          load_text_split, score, tasks, tokenize_split)
from moa_jax.data.moa_tasks import moa_tasks_dataset_builder as mtb
from tests.data_helpers import make_census_dir, make_jsonl_dir, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The `tiny` builder config built once into a temporary data dir."""
    d = str(tmp_path_factory.mktemp("tfds"))
    mtb.prepare("tiny", d)
    return d


@pytest.fixture(scope="module")
def tok(tiny_dir):
    text = load_text_split(DataConfig(builder_config="tiny", data_dir=tiny_dir), "train")
    corpus = [e["messages"][0]["content"] + " " + e["response"] for d in text.domains for e in text.examples[d]]
    return tiny_tokenizer(corpus + [TASK_SYSTEM_PROMPT], vocab_size=1000)


# ---- embedded dataset ----
def test_tiny_builder_builds_and_reads_without_tensorflow(tiny_dir, tmp_path):
    assert importlib.util.find_spec("tensorflow") is None  # not installed: the build cannot have used it
    cfg = DataConfig(builder_config="tiny", data_dir=tiny_dir)
    splits = {s: load_text_split(cfg, s) for s in ("train", "validation", "test")}
    assert "tensorflow" not in sys.modules
    assert os.path.isdir(os.path.join(tiny_dir, "moa_tasks", "tiny", str(mtb.MoaTasks.VERSION)))
    for s, n in (("train", 64), ("validation", 16), ("test", 16)):
        assert splits[s].domains == DOMAIN_NAMES and splits[s].counts() == {d: n for d in DOMAIN_NAMES}
    for d in DOMAIN_NAMES:  # disjoint splits: no prompt appears in two splits of a domain
        prompts = [e["messages"][0]["content"] for s in splits.values() for e in s.examples[d]]
        assert len(prompts) == len(set(prompts)) == 96
        # the test split is the head of the domain's stream, so it is stable across builder configs
        assert [e["messages"][0]["content"] for e in splits["test"].examples[d]] == \
               [e["prompt"] for e in tasks.generate(d, 16)]
    # a second build elsewhere holds exactly the same records (every host may build its own copy)
    again = mtb.prepare("tiny", str(tmp_path)).as_data_source()["validation"]
    first = mtb.prepare("tiny", tiny_dir).as_data_source()["validation"]
    assert again.__getitems__(range(len(again))) == first.__getitems__(range(len(first)))
    ex = splits["test"].examples["chain_sum"][0]
    assert is_correct("chain_sum", ex["answer"], {**ex, "prompt": ex["messages"][0]["content"]})


def test_registry_fingerprint_matches_version():
    assert mtb.registry_fingerprint() == mtb.REGISTRY_FINGERPRINT, (
        "the task registry changed: bump MoaTasks.VERSION and set REGISTRY_FINGERPRINT = "
        f"{mtb.registry_fingerprint()!r}")


def test_reference_answers_score_full_and_extraction():
    for d in DOMAIN_NAMES:
        ex = next(tasks.generate(d, 1))
        assert score(d, ex["answer"], ex) == 1.0, d
        assert score(d, "certainly not the answer", ex) < 1.0, d
    assert extract_answer("\n  42.\nbecause 40 + 2") == "42"
    assert extract_answer("3.5") == "3.5" and extract_answer("") == ""
    with pytest.raises(DataError, match="unknown domain 'nope'"):
        tasks.get_domain("nope")


def test_unknown_domain_of_embedded_source(tiny_dir):
    with pytest.raises(DataError, match="unknown domain 'algebra'.*chain_sum"):
        load_text_split(DataConfig(builder_config="tiny", data_dir=tiny_dir, domains=("chain_sum", "algebra")),
                        "train")
    with pytest.raises(DataError, match="unknown moa_tasks builder config 'huge'"):
        mtb.prepare("huge", tiny_dir)


# ---- tokenisation and masks ----
def test_masks_and_system_prompt(tiny_dir, tok):
    cfg = DataConfig(builder_config="tiny", data_dir=tiny_dir, domains=("syllogism", "chain_sum"))
    data = load_split(cfg, tok, "validation")
    assert data.domains == ("syllogism", "chain_sum") and len(data) == 32
    for i in (0, 17):
        ex = data.example(i)
        ids, p = data.tokens(i), data.prompt_len[i]
        # the prompt part is exactly what apply_chat_template(add_generation_prompt=True) gives at inference
        conv = [{"role": "system", "content": TASK_SYSTEM_PROMPT}] + ex["messages"]
        assert list(ids[:p]) == list(tok.apply_chat_template(conv, add_generation_prompt=True)["input_ids"])
        assert tok.decode(ids[p:]) == ex["response"] + tok.eos_token and ids[-1] == tok.eos_token_id
    # system_prompt=None: no system turn is added (the template's default, if any, applies)
    plain = load_split(DataConfig(builder_config="tiny", data_dir=tiny_dir, domains=("chain_sum",),
                                  system_prompt=None), tok, "validation")
    assert TASK_SYSTEM_PROMPT not in tok.decode(plain.tokens(0))


def test_overlong_examples_counted_logged_and_policies(tmp_path, caplog):
    root = make_jsonl_dir(tmp_path / "d", long_every=5)  # alpha rows 0, 5, 10, ... are ~200 words longer
    tok = tiny_tokenizer()
    cfg = DataConfig(source=f"jsonl:{root}", max_len=128, buckets=(64, 128), holdout_fraction=0.0)
    text = load_text_split(cfg, "train")
    with caplog.at_level(logging.WARNING, logger="moa_jax.data"):
        data = tokenize_split(text, tok, max_len=128, policy="drop")
    rows = data.report.rows
    assert rows["alpha"]["over_long"] == rows["alpha"]["dropped"] == 6 and rows["alpha"]["kept"] == 24
    assert rows["beta"]["over_long"] == 0 and data.report.over_long == 6
    assert "6 example(s) longer than max_len=128" in caplog.text and "alpha" in caplog.text
    assert json.loads(json.dumps(data.report.to_dict()))["rows"]["alpha"]["dropped"] == 6
    trunc = tokenize_split(text, tok, max_len=128, policy="truncate_left")
    assert trunc.report.rows["alpha"]["truncated"] == 6 and len(trunc) == len(data) + 6
    assert trunc.lengths.max() <= 128
    i = int(np.argmax(trunc.lengths))
    assert tok.decode(trunc.tokens(i)[trunc.prompt_len[i]:]) == trunc.example(i)["response"] + tok.eos_token
    with pytest.raises(DataError, match=r"longer than max_len=128: \{'alpha': 6\}"):
        tokenize_split(text, tok, max_len=128, policy="error")


# ---- JSONL sources ----
def test_jsonl_flat_dir_hash_splits(tmp_path):
    root = make_jsonl_dir(tmp_path / "d")
    cfg = DataConfig(source=f"jsonl:{root}", holdout_fraction=0.2)
    splits = {s: load_text_split(cfg, s) for s in ("train", "validation", "test")}
    assert all(s.domains == ("alpha", "beta", "gamma") for s in splits.values())
    for d, n in (("alpha", 30), ("beta", 12), ("gamma", 6)):
        prompts = [e["messages"][-1]["content"] for s in splits.values() for e in s.examples[d]]
        assert len(prompts) == len(set(prompts)) == n  # disjoint and complete
    # deterministic: a second read assigns the same examples
    assert load_text_split(cfg, "validation").examples == splits["validation"].examples


def test_jsonl_split_folders_domain_field_and_messages(tmp_path):
    write_jsonl(tmp_path / "train" / "mixed.jsonl", [
        {"domain": "b", "prompt": "p1", "response": "r1"},
        {"domain": "a", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "p2"},
                                     {"role": "assistant", "content": "r2"}]}])
    write_jsonl(tmp_path / "validation" / "a.jsonl", [{"prompt": "p3", "response": "r3"}])
    cfg = DataConfig(source=f"jsonl:{tmp_path}")
    train = load_text_split(cfg, "train")
    assert train.domains == ("a", "b") and train.examples["a"][0]["messages"][0]["content"] == "be brief"
    with pytest.raises(DataError, match=r"domain\(s\) \['b'\] have no examples in this split"):
        load_text_split(cfg, "validation")  # ids must not shift: 'b' is a domain of the source
    assert load_text_split(DataConfig(source=f"jsonl:{tmp_path}", domains=("a",)), "validation").counts() == {"a": 1}
    with pytest.raises(DataError, match="no 'test'/ folder"):
        load_text_split(cfg, "test")
    # a system turn in the data wins over DataConfig.system_prompt
    data = tokenize_split(train, tiny_tokenizer(), max_len=256, system_prompt="other")
    assert "be brief" in tiny_tokenizer().decode(data.tokens(0)) and "other" not in tiny_tokenizer().decode(
        data.tokens(0))


@pytest.mark.parametrize("lines, match", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '], r"x\.jsonl:2: malformed JSON"),
    (['{"prompt": "a"}'], r"x\.jsonl:1: missing field 'response'"),
    (['{"response": "a"}'], r"x\.jsonl:1: missing field 'prompt'"),
    (['{"prompt": 3, "response": "a"}'], r"x\.jsonl:1: field 'prompt' must be a string"),
    (['{"prompt": "a", "response": "b", "domain": ""}'], r"x\.jsonl:1: field 'domain' must be a non-empty"),
    (['[1, 2]'], r"x\.jsonl:1: each line must be a JSON object"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}'],
     r"x\.jsonl:1: the last message must be the assistant's response"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}'],
     r"x\.jsonl:1: messages\[1\] must be"),
    (['{"prompt": "a", "response": "  "}'], r"x\.jsonl:1: empty response"),
    ([], r"x\.jsonl: no examples \(empty file\)"),
])
def test_jsonl_bad_input(tmp_path, lines, match):
    write_jsonl(tmp_path / "x.jsonl", lines)
    with pytest.raises(DataError, match=match):
        load_text_split(DataConfig(source=f"jsonl:{tmp_path}"), "train")


def test_jsonl_byte_order_mark_and_cut_off_lines(tmp_path):
    """A UTF-8 BOM at the start of a file (Windows exports) is accepted; a line cut off at its end is reported as
    such (not as 'column 1' of the next line), and a mid-line error names its real column."""
    (tmp_path / "bom").mkdir()
    (tmp_path / "bom" / "w.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "p1", "response": "r1"}\r\n'
                                               b'{"prompt": "p2", "response": "r2"}\r\n')
    text = load_text_split(DataConfig(source=f"jsonl:{tmp_path / 'bom'}", holdout_fraction=0.0), "train")
    assert [e["messages"][0]["content"] for e in text.examples["w"]] == ["p1", "p2"]
    for line, match in (('{"prompt": "a", "response": "b"', r"x\.jsonl:2: malformed JSON: the line ends before the "
                         r"JSON value is complete \(Expecting ',' delimiter at column 32\)"),
                        ('{"prompt": "a", "response": "b', r"x\.jsonl:2: malformed JSON: the line ends before"),
                        ('{"prompt": "a" "response": "b"}', r"x\.jsonl:2: malformed JSON \(Expecting ',' delimiter "
                         r"at column 16\)")):
        write_jsonl(tmp_path / "cut" / "x.jsonl", ['{"prompt": "a", "response": "b"}', line])
        with pytest.raises(DataError, match=match):
            load_text_split(DataConfig(source=f"jsonl:{tmp_path / 'cut'}"), "train")


def test_line_level_domains_get_a_table_and_typo_warnings(tmp_path, capsys):
    from moa_jax.data import inspect as data_inspect
    root = make_census_dir(tmp_path / "c")
    assert data_inspect.main(["--source", f"jsonl:{root}", "--tokenizer", "none"]) == 0
    out = capsys.readouterr().out
    assert "domain                    lines  source files\ncdoe                          3  code.jsonl (3)\n" in out
    assert "chat                         20  mixed.jsonl (20)" in out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2, warnings   # 'chat' lives in a mixed file, not in another domain's: no warning
    assert "'cdoe' appears only in ['code.jsonl'], whose lines otherwise belong to domain(s) ['code']" in warnings[0]
    assert "'mth' has only 1 of 204 lines (< 1%)" in warnings[1]
    assert load_text_split(DataConfig(source=f"jsonl:{make_jsonl_dir(tmp_path / 'f')}"), "train").census.line_level \
        is False   # file-stem domains: no table


def test_jsonl_non_utf8_empty_dir_unknown_domain(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "y.jsonl").write_bytes(b'{"prompt": "ok", "response": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"y\.jsonl:2: not valid UTF-8"):
        load_text_split(DataConfig(source=f"jsonl:{tmp_path / 'bad'}"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.jsonl files"):
        load_text_split(DataConfig(source=f"jsonl:{tmp_path / 'empty'}"), "train")
    with pytest.raises(DataError, match="is not a directory"):
        load_text_split(DataConfig(source=f"jsonl:{tmp_path / 'missing'}"), "train")
    root = make_jsonl_dir(tmp_path / "ok")
    with pytest.raises(DataError, match=r"unknown domain\(s\) \['delta'\]; the source has \['alpha', 'beta', "):
        load_text_split(DataConfig(source=f"jsonl:{root}", domains=("alpha", "delta")), "train")


# ---- tfds catalog source ----
def test_tfds_catalog_source_with_field_map(tmp_path):
    from tests.data_helpers import MoaTestQa
    MoaTestQa(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = DataConfig(source="tfds:moa_test_qa", data_dir=str(tmp_path),
                     field_map="prompt=question,response=answer,domain=topic")
    train = load_text_split(cfg, "train")
    assert train.domains == ("geo", "math") and train.counts() == {"geo": 10, "math": 10}
    assert {e["response"] for e in train.examples["math"]} == {f"answer {i}" for i in range(1, 20, 2)}
    one = load_text_split(DataConfig(source="tfds:moa_test_qa", data_dir=str(tmp_path),
                                     field_map="prompt=question,response=answer"), "test")
    assert one.domains == ("moa_test_qa",) and one.counts() == {"moa_test_qa": 6}
    with pytest.raises(DataError, match="field_map response='reply', but its features are"):
        load_text_split(DataConfig(source="tfds:moa_test_qa", data_dir=str(tmp_path),
                                   field_map="prompt=question,response=reply"), "train")
    with pytest.raises(DataError, match="does not map 'response'"):
        load_text_split(DataConfig(source="tfds:moa_test_qa", data_dir=str(tmp_path), field_map="prompt=question"),
                        "train")


def test_data_config_validation():
    with pytest.raises(ConfigError, match="strictly increasing"):
        DataConfig(buckets=(128, 64))
    with pytest.raises(ConfigError, match="max_len=512 must be in"):
        DataConfig(max_len=512)
    with pytest.raises(ConfigError, match="source='csv:x'"):
        DataConfig(source="csv:x")
    with pytest.raises(ConfigError, match="mixing='random'"):
        DataConfig(mixing="random")
    assert hash(DataConfig(domains=["a"])) == hash(DataConfig(domains=("a",)))


def test_inspect_cli_prints_counts_lengths_and_examples(tiny_dir, tok, tmp_path, capsys, monkeypatch):
    from moa_jax.data import inspect as data_inspect
    monkeypatch.setattr(data_inspect, "load_tokenizer", lambda name: tok)
    assert data_inspect.main(["--config", "tiny", "--data-dir", tiny_dir, "--split", "test", "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "moa_tasks/tiny:test: 160 examples in 10 domains" in out and "[[" in out and "p95" in out
    assert all(d in out for d in DOMAIN_NAMES)
    assert "prompt format: chat" in out and "<|im_start|>user" in out      # auto: the tokenizer has a template
    assert data_inspect.main(["--config", "tiny", "--data-dir", tiny_dir, "--split", "test", "--examples", "1",
                              "--prompt-format", "plain"]) == 0
    out = capsys.readouterr().out
    assert "prompt format: plain" in out and "<|im_start|>" not in out
    monkeypatch.undo()
    root = make_jsonl_dir(tmp_path / "j")
    assert data_inspect.main(["--source", f"jsonl:{root}", "--tokenizer", "none"]) == 0
    assert "alpha" in capsys.readouterr().out
