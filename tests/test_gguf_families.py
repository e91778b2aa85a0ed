"""GGUF files of the qwen3 and gemma3 architectures, and SentencePiece tokenizers from GGUF, against transformers.

A tiny random Hugging Face model of each family is written as a llama.cpp-style GGUF with the `gguf` package: norms
and embeddings F32 (gemma3 norms stored as 1 + w, as llama.cpp's converter does), q/k/v and the MLP in Q8_0 and
Q5_0 (quantised by `gguf`), and attn_output as a K-quant (Q4_K for qwen3, Q6_K for gemma3) made of random blocks
with a small scale (`gguf` cannot quantise K-quants; any block is a valid one). Our loader's logits must equal
transformers' own GGUF loading of the same file (`from_pretrained(dir, gguf_file=...)`, an independent reading of
names, layouts, norm offsets and metadata) to 1e-4 in float32, on T = 32 > the gemma3 window of 8. The shapes
follow what transformers reads from GGUF metadata: qwen3 with head_dim 128 (transformers' default, it does not
read key_length for qwen3), gemma3 with head_dim 256 (its default query_pre_attn_scalar; llama.cpp scales by
key_length**-0.5) and 6 layers (every 6th global, as llama.cpp and transformers both assume).

The tokenizer test writes a 32-token SentencePiece vocabulary (tokenizer.ggml.model "llama", no merges, as Gemma
files have) and checks hand-derived ids. A last test runs only when the optional Gemma 3 270M package is installed.

Shape glossary: T tokens, V vocab, D width, F MLP width, Dh head width.
"""
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from moa_jax.loading import load_gguf, load_tokenizer, resolve_source
from moa_jax.loading.resolve import ModelSourceError
from moa_jax.nn.model import MoATransformer

torch.set_num_threads(2)
TOL = 1e-4
T, WINDOW = 32, 8
# SentencePiece vocabulary: merges are recovered from the token order (gemma) / scores.
SP_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581", "h", "e", "l", "o", "w", "r", "d", "\u2581h", "ll",
             "\u2581he", "\u2581hell", "\u2581hello", "\u2581w", "or", "\u2581wor", "ld", "\u2581world"]
SP_TOKENS += [f"<unused{i}>" for i in range(32 - len(SP_TOKENS))]
V = len(SP_TOKENS)
SPECS = {
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config,
              dict(num_hidden_layers=2, head_dim=128, tie_word_embeddings=False)),
    "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig,
               dict(num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256, sliding_window=WINDOW)),
}
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-6)
K_QUANT = {"qwen3": Q.Q4_K, "gemma3": Q.Q6_K}
_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_QWEN_NAMES = {**_NAMES, "post_attention_layernorm": "ffn_norm"}
_GEMMA_NAMES = {**_NAMES, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def random_k_quant(rows: int, cols: int, kind, rng) -> np.ndarray:
    """[rows, bytes] of random K-quant blocks whose f16 super-block scale(s) are set to 0.01 (random bytes there
    could be inf/NaN). Q4_K block (144 B): d, dmin (f16) first; Q6_K block (210 B): d (f16) last."""
    block_bytes = {Q.Q4_K: 144, Q.Q6_K: 210}[kind]
    blocks = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if kind == Q.Q4_K:
        blocks[..., 0:2], blocks[..., 2:4] = scale, scale
    else:
        blocks[..., 208:210] = scale
    return blocks.reshape(rows, -1)


def write_gguf(arch: str, model, path: str, raw_types: dict = {}) -> None:  # noqa: B006 (read only)
    """The torch model's weights as a GGUF file with llama.cpp's names and metadata; raw_types: tensor name ->
    a type written as random bytes (for the error tests)."""
    cfg = model.config
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_token_list(SP_TOKENS)
    w.add_token_scores([-float(i) for i in range(V)])
    w.add_token_types([3 if t.startswith("<") else 1 for t in SP_TOKENS])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    names = _GEMMA_NAMES if arch == "gemma3" else _QWEN_NAMES
    for key, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if key.startswith("model.layers."):
            layer, rest = key[len("model.layers."):].split(".", 1)
            name = f"blk.{layer}.{names[rest.removesuffix('.weight')]}.weight"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[key]
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0   # llama.cpp's converter stores Gemma's norms as 1 + w
        if name in raw_types:
            kind = raw_types[name]
            block, size = gguf.GGML_QUANT_SIZES[kind]
            w.add_tensor(name, rng.integers(0, 256, (array.shape[0], array.shape[1] // block * size), np.uint8),
                         raw_dtype=kind)
        elif array.ndim == 1 or name == "token_embd.weight":
            w.add_tensor(name, array)
        elif "attn_output" in name:
            kind = K_QUANT[arch]
            w.add_tensor(name, random_k_quant(*array.shape, kind, rng), raw_dtype=kind)
        else:
            kind = Q.Q8_0 if "attn_" in name else Q.Q5_0
            w.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=sorted(SPECS))
def tiny_gguf(request, tmp_path_factory):
    arch = request.param
    model_cls, config_cls, overrides = SPECS[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**BASE, **overrides)).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp(arch) / f"{arch}.gguf")
    write_gguf(arch, model, path)
    return arch, path


def test_gguf_logits_match_transformers_gguf(tiny_gguf):
    arch, path = tiny_gguf
    cfg, params = load_gguf(path)
    kinds = {t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert {Q.Q8_0, Q.Q5_0, K_QUANT[arch], Q.F32} <= kinds
    tokens = np.random.default_rng(1).integers(0, V, (2, T)).astype(np.int32)
    ours = np.asarray(MoATransformer(cfg).apply({"params": params}, jnp.asarray(tokens), routing="base")[0])
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = theirs_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    diff = float(np.max(np.abs(ours - theirs)))
    print(f"[gguf families] {arch}: max|diff| = {diff:.2e}")
    assert diff <= TOL
    if arch == "gemma3":
        assert cfg.layer_types.count("full_attention") == 1 and cfg.sliding_window == WINDOW < T
        assert cfg.norm_unit_offset and cfg.tie_word_embeddings and cfg.query_pre_attn_scalar == 256
    else:
        assert cfg.qk_norm and cfg.head_dim == 128 and not cfg.tie_word_embeddings


def test_sentencepiece_tokenizer_from_gguf(tiny_gguf):
    """Hand-derived: merges follow the token order, so ' hello world' -> bos, '\u2581hello', '\u2581world'; Gemma
    adds no prefix space, so 'hello world' starts with single letters."""
    arch, path = tiny_gguf
    tok = load_tokenizer(path)
    ids = SP_TOKENS.index
    assert tok(" hello world")["input_ids"] == [2, ids("\u2581hello"), ids("\u2581world")]
    if arch == "gemma3":
        assert tok("hello world")["input_ids"] == [2, ids("h"), ids("e"), ids("ll"), ids("o"), ids("\u2581world")]
    assert tok.decode(tok(" hello world")["input_ids"], skip_special_tokens=True).strip() == "hello world"
    assert tok.bos_token == "<bos>" and tok.eos_token == "<eos>" and tok.pad_token == "<pad>"


@pytest.mark.slow   # ~100 s: parsing the 262k-token vocabulary twice, two 18-layer loads
def test_gemma3_270m_if_installed():
    """The optional real model (scripts/setup_env.sh --gemma3-270m): its config, and one prompt's greedy next token
    against transformers' GGUF loading. The 20-prompt figures: benchmarks/studies/gemma3_logits.py."""
    try:
        path = resolve_source("gemma3-270m")[1]
    except ModelSourceError:
        pytest.skip("gemma3-270m is not installed (bash scripts/setup_env.sh --gemma3-270m)")
    cfg, params = load_gguf(path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.sliding_window) == (
        18, 640, 256, 262144, 512)
    tok = load_tokenizer(path)
    assert tok.chat_template is None   # a base model: no chat template in the file
    ids = tok("The capital of France is")["input_ids"]
    ours = np.asarray(MoATransformer(cfg).apply({"params": params}, jnp.asarray([ids]), routing="base")[0])
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = theirs_model(torch.as_tensor([ids])).logits.numpy()
    assert float(np.max(np.abs(ours - theirs))) <= 1e-3   # 18 layers, logits of order 30, f32
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_unsupported_gguf_contents_are_one_line_errors(tmp_path):
    """A tensor type the gguf package cannot dequantise (Q8_1) names the tensor and the type; an architecture we do
    not load names the architecture. Both UserErrors: one `error:` line at the command line."""
    from moa_jax.errors import UserError
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**BASE, **SPECS["qwen3"][2])).eval()
    path = str(tmp_path / "q81.gguf")
    write_gguf("qwen3", model, path, raw_types={"blk.1.attn_q.weight": Q.Q8_1})
    with pytest.raises(UserError, match=r"'blk\.1\.attn_q\.weight' of type Q8_1") as info:
        load_gguf(path)
    assert len(str(info.value).splitlines()) == 1
    other = gguf.GGUFWriter(str(tmp_path / "phi3.gguf"), "phi3")
    other.write_header_to_file()
    other.write_kv_data_to_file()
    other.write_tensors_to_file()
    other.close()
    with pytest.raises(UserError, match="GGUF architecture 'phi3' is not supported"):
        load_gguf(str(tmp_path / "phi3.gguf"))
