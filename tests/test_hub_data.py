"""`data.source="hf:NAME[:CONFIG]"` (moa_jax/data/sources.py), offline: datasets written on the fly as a local
dataset directory and as a dataset repository in a fake Hugging Face Hub cache, read through the experiment
pipeline (moa_jax.data.pipeline.load_split) with a field map and domains."""
import datasets
import pytest
from huggingface_hub import constants as hub_constants

from moa_jax.config import ConfigError, DataConfig
from moa_jax.data.pipeline import load_split
from moa_jax.data.sources import load_text_split
from moa_jax.data.tasks import DataError
from tests.data_helpers import tiny_tokenizer
from tests.test_cli_errors import assert_user_error, run_experiment_cli
from tests.test_hub_model import cache_repo

TOPICS = ("math", "code", "chat")
README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train.parquet
  - split: dev
    path: main/dev.parquet
  - split: test
    path: main/test.parquet
- config_name: other
  data_files:
  - split: train
    path: other/train.parquet
---
# a tiny test dataset
"""


def rows(n, split, label=False):
    topic = [i % 3 if label else TOPICS[i % 3] for i in range(n)]
    return {"question": [f"{split} question {i} about {TOPICS[i % 3]}?" for i in range(n)],
            "answer": [f"answer {i}" for i in range(n)], "topic": topic, "extra": list(range(n))}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No network, and every cache inside tmp_path."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_local_dataset_dir_with_text_domains_and_carved_validation(tmp_path, tok):
    """train + test only: validation is carved from train by the prompt hash; domains = sorted topic values."""
    folder = tmp_path / "qa"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows(120, "train")).to_json(str(folder / "data" / "train.jsonl"))
    datasets.Dataset.from_dict(rows(30, "test")).to_json(str(folder / "data" / "test.jsonl"))
    cfg = DataConfig(source=f"hf:{folder}", field_map="prompt=question,response=answer,domain=topic",
                     holdout_fraction=0.2)
    splits = {s: load_text_split(cfg, s) for s in ("train", "validation", "test")}
    for ts in splits.values():
        assert ts.domains == ("chat", "code", "math")
    assert sum(splits["test"].counts().values()) == 30
    n_train, n_val = (sum(splits[s].counts().values()) for s in ("train", "validation"))
    assert n_train + n_val == 120 and 0 < n_val < 60   # the dataset has a test split: nothing else leaves train
    prompts = {s: {e["messages"][0]["content"] for d in ts.domains for e in ts.examples[d]} for s, ts in splits.items()}
    assert not prompts["train"] & prompts["validation"]
    ex = splits["test"].examples["code"][0]
    assert ex["messages"] == [{"role": "user", "content": "test question 1 about code?"}]
    assert ex["response"] == ex["answer"] == "answer 1"

    tokenized = load_split(cfg, tok, "validation")
    assert tokenized.domains == ("chat", "code", "math") and len(tokenized) == n_val

    with pytest.raises(DataError, match=r"hf:.*qa has splits \['test', 'train'\], none named \['validation', "
                                        r"'valid', 'val', 'dev'\]; set data.holdout_fraction > 0"):
        load_text_split(DataConfig(source=cfg.source, field_map=cfg.field_map, holdout_fraction=0.0), "validation")
    with pytest.raises(DataError, match=r"field_map response='reply', but its features are \['answer', 'extra', "):
        load_text_split(DataConfig(source=cfg.source, field_map="prompt=question,response=reply"), "train")


def test_hub_dataset_from_the_offline_hub_cache_with_config_and_class_labels(tmp_path, tok):
    """A dataset repo (README configs, parquet, ClassLabel domain, a 'dev' split) in the Hub cache, read offline."""
    snapshot = cache_repo(str(tmp_path / "hub"), "org/qa", {"README.md": README.encode()})
    snapshot = snapshot.replace("models--org--qa", "datasets--org--qa")
    (tmp_path / "hub" / "models--org--qa").rename(tmp_path / "hub" / "datasets--org--qa")
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "topic": datasets.ClassLabel(names=list(TOPICS)), "extra": datasets.Value("int64")})
    for split, n in (("train", 60), ("dev", 12), ("test", 15)):
        datasets.Dataset.from_dict(rows(n, split, label=True), features=features).to_parquet(
            f"{snapshot}/main/{split}.parquet")
    datasets.Dataset.from_dict(rows(9, "other", label=True), features=features).to_parquet(
        f"{snapshot}/other/train.parquet")

    cfg = DataConfig(source="hf:org/qa:main", field_map="prompt=question,response=answer,domain=topic",
                     domains=("chat", "math"))
    val = load_split(cfg, tok, "validation")   # the dataset's 'dev' split
    assert val.domains == ("chat", "math") and len(val) == 8
    test = load_text_split(cfg, "test")
    assert test.counts() == {"chat": 5, "math": 5}
    assert test.examples["math"][1]["messages"][0]["content"] == "test question 3 about math?"

    other = load_text_split(DataConfig(source="hf:org/qa:other", field_map="prompt=question,response=answer"),
                            "train")   # no domain column: one domain named after the dataset; holdout carving
    assert other.domains == ("qa",) and 0 < other.counts()["qa"] <= 9

    with pytest.raises(DataError, match=r"hf:org/qa:nope: .*'nope' not found"):
        load_text_split(DataConfig(source="hf:org/qa:nope", field_map=cfg.field_map), "train")


def test_hf_source_errors_name_the_dataset(tmp_path, capsys, caplog):
    with pytest.raises(DataError, match=r"hf:org/missing: dataset 'org/missing' is neither a local directory nor "
                                        r"in the Hugging Face caches and HF_HUB_OFFLINE=1"):
        load_text_split(DataConfig(source="hf:org/missing", field_map="prompt=q,response=a"), "train")
    with pytest.raises(DataError, match="does not map 'response'"):
        load_text_split(DataConfig(source="hf:org/missing", field_map="prompt=q"), "train")
    (tmp_path / "bad" / "data").mkdir(parents=True)
    (tmp_path / "bad" / "data" / "train.jsonl").write_text('{"q": "a", "a": "b"}\n{"q": "x"\n')
    with pytest.raises(DataError, match=r"hf:bad: its data files cannot be read \(.*JSON parse error"):
        load_text_split(DataConfig(source="hf:bad", field_map="prompt=q,response=a"), "train")
    (tmp_path / "nulls" / "data").mkdir(parents=True)
    (tmp_path / "nulls" / "data" / "train.jsonl").write_text('{"q": "a", "a": "b"}\n{"q": "x", "a": null}\n')
    with pytest.raises(DataError, match=r"hf:nulls\[train\]\[1\]: field 'response' must be a string, got NoneType"):
        load_text_split(DataConfig(source="hf:nulls", field_map="prompt=q,response=a"), "train")
    with pytest.raises(ConfigError, match=r"'hf:NAME\[:CONFIG\]'"):
        DataConfig(source="hf:")
    rc, err = run_experiment_cli(capsys, caplog, f"--workdir={tmp_path / 'w'}", "--set", "data.source=hf:org/missing",
                                 "--set", "data.field_map=prompt=q,response=a")
    assert_user_error(rc, err, "hf:org/missing: dataset 'org/missing' is neither a local directory")
