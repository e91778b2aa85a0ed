"""Saved models: the adapters file (safetensors, and the older index.json + .npy folders), save_pretrained /
from_pretrained bit for bit, and push_to_hub offline (the Hub calls replaced by stand-ins that record the upload)."""
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

import moa_jax
from moa_jax.errors import UserError
from moa_jax.pretrained import PretrainedError
from moa_jax.train.checkpoint import AdapterCorruptError, load_adapters, save_adapters

IDS = np.array([[1, 5, 9, 22, 40, 7, 3, 60], [2, 8, 11, 50, 4, 4, 17, 33]], np.int32)   # vocabulary 64


def _bits(tree) -> dict:
    """{path: (dtype, shape, bytes)}: equal exactly when every array is bit-identical, dtype included."""
    return {k: (np.asarray(v).dtype, np.shape(v), np.asarray(v).tobytes())
            for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def test_adapters_file_round_trips_every_dtype_and_reads_the_older_format(tmp_path):
    rng = np.random.default_rng(0)
    tree = {"layers": {"attn": {"q_proj": {"lora_a": rng.standard_normal((2, 3, 8, 4)).astype(ml_dtypes.bfloat16),
                                           "lora_b": rng.standard_normal((2, 3, 4, 8)).astype(np.float32)}},
                       "router": {"kernel": rng.standard_normal((2, 8, 3)).astype(np.float16)}}}
    folder = tmp_path / "adapters"
    save_adapters(str(folder), tree, {"moa": {"rank": 4}})
    assert sorted(os.listdir(folder)) == ["adapters.safetensors", "config.json"]
    loaded, config = load_adapters(str(folder))
    assert _bits(loaded) == _bits(tree) and config == {"moa": {"rank": 4}}
    from safetensors import safe_open
    with safe_open(str(folder / "adapters.safetensors"), framework="numpy") as f:
        assert sorted(f.keys()) == ["layers/attn/q_proj/lora_a", "layers/attn/q_proj/lora_b", "layers/router/kernel"]

    legacy = tmp_path / "legacy"   # what older versions wrote: index.json naming one .npy file per array
    legacy.mkdir()
    flat = traverse_util.flatten_dict(tree)
    for i, (k, v) in enumerate(sorted(flat.items())):
        np.save(legacy / f"{i:04d}.npy", v, allow_pickle=False)
    (legacy / "index.json").write_text(json.dumps({"/".join(k): f"{i:04d}.npy" for i, k in enumerate(sorted(flat))}))
    (legacy / "config.json").write_text("{}")
    assert _bits(load_adapters(str(legacy))[0]) == _bits(tree)

    data = bytearray((folder / "adapters.safetensors").read_bytes())
    data[-3] ^= 0xFF   # a flipped bit in the last array: the file still parses, its digest does not match
    (folder / "adapters.safetensors").write_bytes(bytes(data))
    with pytest.raises(AdapterCorruptError, match=r"adapters.safetensors is damaged \(1 array\(s\) differ from "
                                                  r"their digest, e.g. \['layers/router/kernel'\]\)"):
        load_adapters(str(folder))
    (folder / "adapters.safetensors").write_bytes(bytes(data[:-10]))
    with pytest.raises(AdapterCorruptError, match="is damaged"):
        load_adapters(str(folder))


def tiny_checkpoint(folder) -> str:
    """A tiny random Llama as a Hugging Face checkpoint folder (config.json + model.safetensors, no tokenizer),
    written from numpy: no torch, nothing compiled."""
    from safetensors.numpy import save_file
    from moa_jax.export import hf_config_dict, merged_plan
    from tests.conftest import make_tiny_cfg
    cfg, rng = make_tiny_cfg(name="llama"), np.random.default_rng(0)
    os.makedirs(folder)
    save_file({key: (0.2 * rng.standard_normal(shape)).astype(np.float32) for _, _, key, shape in merged_plan(cfg)},
              os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg), f)
    return str(folder)


def with_experts(base: "moa_jax.MoAModel", moa, seed: int = 1, **fields) -> "moa_jax.MoAModel":
    """`base` (a plain base model) with random experts and routers of `moa` (so every array matters)."""
    import dataclasses
    from moa_jax.params import merge_params, param_shapes, split_params
    rng = np.random.default_rng(seed)
    shapes = traverse_util.flatten_dict(split_params(param_shapes(base.config, moa))[1])
    trainable = {k: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype) for k, s in shapes.items()}
    params = merge_params(base.params, traverse_util.unflatten_dict(trainable))
    return dataclasses.replace(base, moa=moa, params=params, **fields)


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A tiny base with random bfloat16 experts and routers, expert names and prompt settings set."""
    base = moa_jax.load_model(tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny"), dtype="float32")
    moa = moa_jax.MoAConfig(num_experts=3, rank=4, alpha=8.0, targets=("q", "v", "down"), adapter_dtype="bfloat16")
    return with_experts(base, moa, domains=("math", "code", "chat"), system_prompt="", prompt_format="plain")


def _assert_same_model(a, b):
    assert (b.config, b.moa, b.source, b.domains, b.system_prompt, b.prompt_format, b.peft_layouts) == \
           (a.config, a.moa, a.source, a.domains, a.system_prompt, a.prompt_format, a.peft_layouts)
    assert _bits(b.params) == _bits(a.params)
    ours = a.logits(IDS)   # routed: the routers and the chosen experts
    assert np.isfinite(ours).all() and np.array_equal(b.logits(IDS), ours)


def test_save_pretrained_round_trip_is_bit_identical(trained_like, tmp_path):
    model = trained_like
    out = model.save_pretrained(str(tmp_path / "saved"))
    assert sorted(os.listdir(out)) == ["adapters.safetensors", "config.json"]
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model"]["source"] == model.source and config["domains"] == ["math", "code", "chat"]
    assert config["data"] == {"system_prompt": "", "prompt_format": "plain"}
    back = moa_jax.from_pretrained(out)
    _assert_same_model(model, back)
    assert traverse_util.flatten_dict(back.trainable)[("layers", "attn", "q_proj", "lora_a")].dtype == "bfloat16"
    model.save_pretrained(out)   # saving over an earlier save_pretrained folder replaces it

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(PretrainedError, match="already holds files that are not a save_pretrained folder"):
        model.save_pretrained(str(other))
    assert (other / "todo.txt").read_text() == "mine"
    run_like = tmp_path / "run_adapters"   # a run's adapters folder: load_run / load_model(adapters=) read those
    save_adapters(str(run_like), model.trainable, {"moa": {}})
    with pytest.raises(PretrainedError, match="is not a save_pretrained folder"):
        moa_jax.from_pretrained(str(run_like))
    with pytest.raises(UserError, match="is not a folder"):
        moa_jax.from_pretrained(str(tmp_path / "missing"))


def test_push_to_hub_uploads_the_folder_from_pretrained_reads(trained_like, tmp_path, monkeypatch):
    """Offline: HfApi.create_repo / upload_folder and snapshot_download are stand-ins; the uploaded files are
    copied aside as the Hub would keep them, then from_pretrained("ORG/NAME") reads that copy."""
    import huggingface_hub
    calls, hub = [], tmp_path / "hub"

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls.append(("upload_folder", repo_id, kw["revision"]))
        shutil.copytree(folder_path, hub / repo_id)
        return "commit-info"

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kw):
        calls.append(("snapshot_download", repo_id, revision))
        return str(hub / repo_id)

    for name, stand_in in (("create_repo", create_repo), ("create_branch", create_branch),
                           ("upload_folder", upload_folder)):
        monkeypatch.setattr(huggingface_hub.HfApi, name, stand_in)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert trained_like.push_to_hub("me/tiny-moa", private=True, revision="v1") == "commit-info"
    assert calls == [("create_repo", "me/tiny-moa", {"private": True, "repo_type": "model", "exist_ok": True}),
                     ("create_branch", "me/tiny-moa", {"branch": "v1", "repo_type": "model", "exist_ok": True}),
                     ("upload_folder", "me/tiny-moa", "v1")]
    assert sorted(os.listdir(hub / "me" / "tiny-moa")) == ["adapters.safetensors", "config.json"]
    _assert_same_model(trained_like, moa_jax.from_pretrained("me/tiny-moa@v1"))
    assert calls[-1] == ("snapshot_download", "me/tiny-moa", "v1")
