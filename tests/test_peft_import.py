"""PEFT adapters as experts (moa_jax.from_peft) and the merged single-expert export, against PEFT / transformers.

Tiny Llama and Qwen2 models and PEFT adapters of different ranks, alphas, rsLoRA settings and targets are built on
the fly; each imported expert forced must give PEFT's logits with that adapter active, and each merged export
loaded by transformers must give our logits with that expert forced.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import peft
import transformers
from flax import traverse_util
from safetensors.numpy import load_file

import moa_jax
from moa_jax.config import MoAConfig
from moa_jax.export import export_merged, export_peft, hf_config_dict
from moa_jax.loading import load_hf_config
from moa_jax.params import init_trainable, split_params
from moa_jax.peft_import import PeftImportError, read_peft_experts

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
TOKENS = np.array([[1, 5, 9, 22, 40, 7, 3, 60], [2, 8, 11, 90, 4, 4, 17, 33]], np.int64)
# (rank, alpha, rsLoRA, targets): every expert different, so the common-scale path is exercised.
ADAPTERS = {"math": (4, 8.0, False, ["q_proj", "v_proj"]),
            "code": (8, 16.0, True, ["q_proj", "k_proj", "o_proj", "down_proj"]),
            "chat": (2, 3.0, False, ["gate_proj", "up_proj", "v_proj"])}


def _base(kind, path):
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=False))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=True))
    model.eval().save_pretrained(path, safe_serialization=True)
    # a word-level tokenizer over the tiny vocabulary, so the directory is a complete checkpoint
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TINY["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0").save_pretrained(path)


def _peft_adapter(base_dir, out_dir, seed, rank, alpha, rslora, targets):
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                             lora_dropout=0.0, init_lora_weights=False)   # random B: the adapter does something
    peft.get_peft_model(base, config).save_pretrained(out_dir)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def peft_setup(request, tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp(request.param)
    base_dir = str(root / "base")
    _base(request.param, base_dir)
    dirs = []
    for seed, (name, spec) in enumerate(ADAPTERS.items()):
        dirs.append(str(root / name))
        _peft_adapter(base_dir, dirs[-1], seed, *spec)
    return base_dir, dirs


def _peft_logits(base_dir, dirs):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    names = [os.path.basename(d) for d in dirs]
    model = peft.PeftModel.from_pretrained(base, dirs[0], adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        model.load_adapter(d, adapter_name=name)
    out = []
    for name in names:
        model.set_adapter(name)
        with torch.no_grad():
            out.append(model(torch.from_numpy(TOKENS)).logits.numpy())
    return out


def test_imported_experts_match_peft(peft_setup):
    base_dir, dirs = peft_setup
    model = moa_jax.from_peft(base_dir, dirs, dtype="float32")
    assert model.domains == tuple(ADAPTERS)
    assert model.moa.rank == 8 and model.moa.num_experts == 3
    theirs = _peft_logits(base_dir, dirs)
    base_logits = model.logits(TOKENS, routing="base")
    for e, ref in enumerate(theirs):
        ours = model.logits(TOKENS, routing="forced", expert=e)
        assert np.max(np.abs(ours - ref)) <= 1e-4, (e, float(np.max(np.abs(ours - ref))))
        assert np.max(np.abs(ours - base_logits)) > 1e-3   # the adapter really changes the output


def _transformers_logits(checkpoint_dir):
    merged = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return merged(torch.from_numpy(TOKENS)).logits.numpy()


@pytest.mark.parametrize("quantize,expert", [(None, "code"), ("int8", "math")])
def test_merged_export_matches_transformers(peft_setup, tmp_path, quantize, expert):
    """Base + one expert merged, loaded by transformers = ours with that expert forced. With quantize="int8"
    (QLoRA's split: int8 base, float experts) the export holds the dequantised base + the expert."""
    base_dir, dirs = peft_setup
    model = moa_jax.from_peft(base_dir, dirs, dtype="float32", quantize=quantize)
    out = model.export_merged(expert, str(tmp_path / "merged"))
    theirs = _transformers_logits(out)
    ours = model.logits(TOKENS, routing="forced", expert=model.domains.index(expert))
    assert np.max(np.abs(ours - theirs)) <= 1e-4, float(np.max(np.abs(ours - theirs)))
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float32"


def test_merged_export_writes_config_and_shards_without_a_hf_source(peft_setup, tmp_path, monkeypatch):
    """The GGUF / built-model path: config.json comes from the ModelConfig; a small shard size forces an index."""
    import moa_jax.export as export
    base_dir, dirs = peft_setup
    model = moa_jax.from_peft(base_dir, dirs, dtype="float32")
    monkeypatch.setattr(export, "SHARD_BYTES", 20_000)
    out = export_merged(model.params, model.config, model.moa, 2, str(tmp_path / "m"), base_source="",
                        dtype="bfloat16")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    assert load_hf_config(out) == moa_jax.ModelConfig(**{**model.config.__dict__, "param_dtype": "float32"})
    theirs = _transformers_logits(out)
    ours = model.logits(TOKENS, routing="forced", expert=2)
    assert np.max(np.abs(ours - theirs)) <= 0.05   # bf16 weights
    assert hf_config_dict(model.config)["num_key_value_heads"] == 2


def test_export_import_export_is_bit_identical(peft_setup, tmp_path):
    base_dir, _ = peft_setup
    cfg = load_hf_config(base_dir)
    moa = MoAConfig(num_experts=2, rank=4, alpha=8.0, dropout=0.05, targets=("q", "v", "up", "down"))
    leaves, treedef = jax.tree_util.tree_flatten(init_trainable(cfg, moa, jax.random.PRNGKey(0)))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    trainable = jax.tree_util.tree_unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    first = export_peft(trainable, cfg, moa, str(tmp_path / "one"), expert_names=["x", "y"], base_model=base_dir)
    model = moa_jax.from_peft(base_dir, first, dtype="float32")
    assert model.moa == moa
    second = export_peft(split_params(model.params)[1], cfg, model.moa, str(tmp_path / "two"),
                         expert_names=list(model.domains), base_model=base_dir)
    for a, b in zip(first, second):
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name


def _rewrite(src, dst, config_changes=None, rename=None):
    os.makedirs(dst, exist_ok=True)
    config = json.load(open(os.path.join(src, "adapter_config.json")))
    config.update(config_changes or {})
    json.dump(config, open(os.path.join(dst, "adapter_config.json"), "w"))
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    if rename:
        tensors = {rename(k): v for k, v in tensors.items()}
    from safetensors.numpy import save_file
    save_file(tensors, os.path.join(dst, "adapter_model.safetensors"))
    return dst


def test_unusable_adapters_are_refused_by_name(peft_setup, tmp_path):
    base_dir, dirs = peft_setup
    cfg = load_hf_config(base_dir)
    cases = {
        "use_dora": _rewrite(dirs[0], str(tmp_path / "dora"), {"use_dora": True}),
        "alpha_pattern": _rewrite(dirs[0], str(tmp_path / "ap"), {"alpha_pattern": {"q_proj": 4}}),
        "embed_tokens": _rewrite(dirs[0], str(tmp_path / "emb"),
                                 rename=lambda k: k.replace("self_attn.q_proj", "embed_tokens")),
        "adapts layer 7": _rewrite(dirs[0], str(tmp_path / "deep"), rename=lambda k: k.replace("layers.1.", "layers.7.")),
        "peft_type": _rewrite(dirs[0], str(tmp_path / "ia3"), {"peft_type": "IA3"}),
    }
    for needle, d in cases.items():
        with pytest.raises(PeftImportError, match=needle):
            read_peft_experts([d], cfg)
    other = moa_jax.ModelConfig(**{**cfg.__dict__, "hidden_size": 64, "head_dim_override": 8})
    with pytest.raises(PeftImportError, match="another architecture"):
        read_peft_experts([dirs[0]], other)
    with pytest.raises(PeftImportError, match="distinct"):
        read_peft_experts([dirs[0], dirs[0]], cfg)
    with pytest.raises(PeftImportError, match="adapter_model.safetensors not found"):
        read_peft_experts([str(tmp_path)], cfg)



def test_export_writes_each_adapter_back_in_its_own_rank_and_targets(peft_setup, tmp_path):
    """Adapters of rank 8 on q, v and of rank 16 on all seven projections share one MoA model (rank 16, seven
    targets); each exports back in its own shape, bit-identical (scale ratio 2 for both). The rank-2 "chat"
    adapter's scale ratio is 1.5: its lora_B comes back within float32 rounding. save_pretrained keeps the shapes."""
    base_dir, dirs = peft_setup
    qv, wide = str(tmp_path / "qv8"), str(tmp_path / "all16")
    _peft_adapter(base_dir, qv, 5, 8, 16.0, False, ["q_proj", "v_proj"])
    _peft_adapter(base_dir, wide, 6, 16, 32.0, False, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    originals = [qv, wide, dirs[2]]
    model = moa_jax.from_peft(base_dir, originals, dtype="float32")
    assert model.moa.rank == 16 and len(model.moa.targets) == 7
    out = model.export_peft(str(tmp_path / "out"))
    for original, exported in zip(originals, out):
        theirs = load_file(os.path.join(original, "adapter_model.safetensors"))
        ours = load_file(os.path.join(exported, "adapter_model.safetensors"))
        assert sorted(ours) == sorted(theirs)
        assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in theirs.items()}
        exact = original != dirs[2]
        for k, v in theirs.items():
            if exact or "lora_A" in k:
                assert ours[k].tobytes() == v.tobytes(), k
            else:
                np.testing.assert_allclose(ours[k], v, rtol=2.0 ** -23, atol=0)
        config, saved = (json.load(open(os.path.join(d, "adapter_config.json"))) for d in (exported, original))
        assert config == saved
    assert len(load_file(os.path.join(out[0], "adapter_model.safetensors"))) == 2 * 2 * 2   # L * (q, v) * (A, B)
    back = moa_jax.from_pretrained(model.save_pretrained(str(tmp_path / "saved")))
    assert back.peft_layouts == model.peft_layouts
    again = back.export_peft(str(tmp_path / "again"))
    for a, b in zip(out, again):
        assert (open(os.path.join(a, "adapter_model.safetensors"), "rb").read()
                == open(os.path.join(b, "adapter_model.safetensors"), "rb").read())
    # weights outside an adapter's own shape (here: expert 0 changed on k_proj) export in the shared shape
    flat = traverse_util.flatten_dict(model.params)
    key = ("layers", "attn", "k_proj", "lora_b")
    flat[key] = flat[key].at[:, 0].set(1.0)
    changed = dataclasses.replace(model, params=traverse_util.unflatten_dict(flat))
    padded = changed.export_peft(str(tmp_path / "changed"))
    assert len(load_file(os.path.join(padded[0], "adapter_model.safetensors"))) == 2 * 7 * 2
    assert json.load(open(os.path.join(padded[0], "adapter_config.json")))["r"] == 16
