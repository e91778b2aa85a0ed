"""Hub ids as model sources (moa_jax/loading/resolve.py), offline: a fake Hugging Face cache is built on the fly.

The cache layout is huggingface_hub's: HF_HUB_CACHE/models--ORG--NAME/{refs/main, snapshots/<commit>/...}. In
process, the cache path and offline flag are patched on huggingface_hub.constants (read at import time from
HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE); one subprocess checks the real environment variables.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import filter_repo_objects

import moa_jax
from moa_jax.loading import check_model_source, load_checkpoint, resolve_source
from moa_jax.loading.resolve import HUB_META_FILES, ModelSourceError, hub_id
from tests.test_cli_errors import ROOT, assert_user_error, run_experiment_cli

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, saved with save_pretrained (safetensors)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=False)).save_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TINY["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0").save_pretrained(path)
    return str(path)


def cache_repo(cache: str, repo_id: str, files: dict) -> str:
    """Writes one snapshot of `repo_id` into a Hub cache; `files`: name -> source path or bytes."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for name, content in files.items():
        if isinstance(content, bytes):
            with open(os.path.join(snapshot, name), "wb") as f:
                f.write(content)
        else:
            shutil.copy(content, os.path.join(snapshot, name))
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = str(tmp_path / "hub")
    os.makedirs(cache)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)   # "org/tiny" must not exist as a relative path
    return cache


def test_hub_id_offline_loads_like_the_directory(tiny_dir, offline_cache):
    snapshot = cache_repo(offline_cache, "org/tiny", {n: os.path.join(tiny_dir, n) for n in os.listdir(tiny_dir)})
    assert resolve_source("org/tiny") == ("hf", snapshot)
    check_model_source("org/tiny")
    cfg_hub, params_hub = load_checkpoint("org/tiny")
    cfg_dir, params_dir = load_checkpoint(tiny_dir)
    assert cfg_hub == cfg_dir
    flat_hub, flat_dir = (traverse_util.flatten_dict(p) for p in (params_hub, params_dir))
    assert flat_hub.keys() == flat_dir.keys()
    for key in flat_dir:
        np.testing.assert_array_equal(flat_hub[key], flat_dir[key], err_msg=str(key))

    by_id, by_dir = moa_jax.load_model("org/tiny"), moa_jax.load_model(tiny_dir)
    ids = np.array([[3, 17, 40, 9, 2, 5]], np.int32)
    np.testing.assert_array_equal(np.asarray(by_id.logits(ids)), np.asarray(by_dir.logits(ids)))
    assert by_id.tokenizer("t5 t9 t33")["input_ids"] == by_dir.tokenizer("t5 t9 t33")["input_ids"] == [5, 9, 33]


def test_hub_id_not_cached_offline_names_the_id(offline_cache, tiny_dir):
    for check in (resolve_source, check_model_source):
        with pytest.raises(ModelSourceError, match=r"Hub model 'org/missing': the model is not in the Hugging Face "
                                                   r"cache .* HF_HUB_OFFLINE=1; download it once .*hf download "
                                                   r"org/missing"):
            check("org/missing")
    # config cached, weights not: the message names the missing file
    cache_repo(offline_cache, "org/noweights", {"config.json": os.path.join(tiny_dir, "config.json")})
    with pytest.raises(ModelSourceError, match=r"'org/noweights': weight file\(s\) \['model.safetensors'\] are not "
                                               r"in the Hugging Face cache"):
        resolve_source("org/noweights")
    assert resolve_source("org/noweights", weights=False)[1].endswith(COMMIT)   # the tokenizer needs no weights


def test_hub_pickle_only_model_is_refused(offline_cache, tiny_dir):
    cache_repo(offline_cache, "org/pickled", {"config.json": os.path.join(tiny_dir, "config.json"),
                                             "pytorch_model.bin": b"not unpickled"})
    with pytest.raises(ModelSourceError, match=r"'org/pickled' has no safetensors weights .* pickle checkpoints "
                                               r"\(pytorch_model.bin\) are never loaded"):
        check_model_source("org/pickled")


def test_not_a_hub_id_keeps_the_path_error(offline_cache):
    for source in ("./org/tiny", "a/b/c", "missing.gguf"):
        with pytest.raises(ModelSourceError, match="no file or directory|does not exist"):
            resolve_source(source)


REMOTE = [".gitattributes", "README.md", "config.json", "generation_config.json", "tokenizer.json",
          "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
          "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "consolidated.safetensors", "pytorch_model.bin", "original/consolidated.00.pth", "onnx/model.onnx"]


def test_online_download_fetches_only_config_tokenizer_and_indexed_shards(tmp_path, monkeypatch, tiny_dir):
    """The two snapshot_download calls against a simulated remote repo: the metadata, then exactly the shards the
    index names at the same commit; never a pickle, a duplicate consolidated file or another subfolder."""
    import huggingface_hub
    cache = str(tmp_path / "hub")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    snapshot = cache_repo(cache, "org/big", {})
    index = b'{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    fetched, revisions = [], []

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None):
        assert repo_id == "org/big"
        revisions.append(revision)
        for name in filter_repo_objects(REMOTE, allow_patterns=allow_patterns):
            fetched.append(name)
            data = index if name.endswith("index.json") else b"{}"
            if name == "config.json":
                shutil.copy(os.path.join(tiny_dir, name), os.path.join(snapshot, name))
            else:
                with open(os.path.join(snapshot, name), "wb") as f:
                    f.write(data)
        return snapshot

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_source("org/big@v1") == ("hf", snapshot)
    assert revisions == ["v1", COMMIT]
    assert sorted(fetched) == sorted(REMOTE[2:13])
    assert set(filter_repo_objects(REMOTE, allow_patterns=HUB_META_FILES)) == set(REMOTE[2:11])
    # what an exported adapter names as its base model
    assert hub_id("org/big@v1") == "org/big"
    assert hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_hub_id_from_the_environment_and_the_experiment_cli(tiny_dir, tmp_path, monkeypatch, capsys, caplog):
    """HF_HOME + HF_HUB_OFFLINE=1 in a fresh process; `--set model=ORG/NAME` in experiments.run (in process)."""
    cache_repo(str(tmp_path / "home" / "hub"), "org/tiny", {n: os.path.join(tiny_dir, n) for n in os.listdir(tiny_dir)})
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    env.pop("HF_HUB_CACHE", None)
    code = ("from moa_jax.loading import load_tokenizer, resolve_source; print(resolve_source('org/tiny')[1]); "
            "print(load_tokenizer('org/tiny')('t7')['input_ids'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "home" / "hub" / "models--org--tiny" / "snapshots" / COMMIT), "[7]"]

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    rc, err = run_experiment_cli(capsys, caplog, f"--workdir={tmp_path / 'w'}", "--set", "model=org/missing")
    assert_user_error(rc, err, "Hub model 'org/missing': the model is not in the Hugging Face cache",
                      "HF_HUB_OFFLINE=1")
