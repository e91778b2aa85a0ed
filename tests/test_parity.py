"""Numerical parity of MoATransformer with Hugging Face transformers + torch (float32).

1. Tiny random Llama / Qwen2 / Mistral checkpoints written to tmp dirs as safetensors, loaded with our loader and
   compared logit by logit: GQA, MQA and MHA, tied and untied heads, llama3 rope scaling (with positions past
   original_max_position_embeddings), Qwen2 q/k/v biases, Mistral's sliding window (smaller than the sequence),
   left and right padding. Each also runs through MoATransformer(cfg, MoAConfig) in 'base' and 'fixed' modes:
   fresh experts (lora_b = 0) must leave the base model unchanged. Weights are drawn wider than HF's default
   init and norm scales / biases are randomised, so attention is sharp and a wrong mask, rotation or bias shows
   up far above the 1e-4 tolerance (the *_matters tests check that the features under test change the logits).
2. The embedded SmolLM2-135M GGUF against transformers' own GGUF loading of the same file: logits, 20 greedy
   tokens through `moa_jax.load_model(...).generate`, and KV-cache decoding against the full forward.
   (Tokenizer ids vs transformers' GGUF tokenizer, plain text and chat template, are in test_loading.py.)
3. The load_model example `docs/example_api.py` (docs/api.md) runs and prints what it should.

Run with `pytest -s tests/test_parity.py` to see every measured max |diff| (lines starting "[parity]").
Shape glossary: B batch, T tokens, V vocab.
"""
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from moa_jax import MoAConfig, load_model
from moa_jax.config import replace
from moa_jax.loading import DEFAULT_MODEL, load_hf_checkpoint, resolve_source
from moa_jax.nn.model import MoATransformer, init_cache
from moa_jax.params import init_trainable, merge_params

torch.set_num_threads(2)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4          # tiny models, f32
GGUF_TOL = 2e-3     # SmolLM2 (30 layers), f32

# ------------------------------------------------------------------------------------------ tiny models

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-5)
# head_dim 16, theta 1e4: wavelengths 6.3 (< 32/4: kept), 20 (blended), >= 63 (> 32: divided by factor).
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
WINDOW = 8
# name -> (model class, config class, config overrides, sequence length T)
SPECS = {
    "llama_gqa_llama3_untied": (LlamaForCausalLM, LlamaConfig,
                                dict(num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=LLAMA3), 48),
    "llama_mha_tied": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True), 24),
    "qwen2_bias_mqa_tied": (Qwen2ForCausalLM, Qwen2Config,
                            dict(num_key_value_heads=1, tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}), 24),
    "mistral_window_gqa_untied": (MistralForCausalLM, MistralConfig,
                                  dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=WINDOW), 32),
}
MOA = MoAConfig(num_experts=4, rank=4, targets="all", dropout=0.0)


def _torch_model(spec: str, path, **config_changes):
    """The checkpoint at `path` loaded by transformers (eager attention: the sliding window is applied)."""
    model_cls, config_cls, overrides, _ = SPECS[spec]
    config = config_cls(**{**BASE, **overrides, **config_changes})
    return model_cls.from_pretrained(path, config=config, attn_implementation="eager", dtype=torch.float32).eval()


def _write_tiny(spec: str, path) -> None:
    model_cls, config_cls, overrides, _ = SPECS[spec]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**BASE, **overrides}))
    with torch.no_grad():  # norm scales (init 1) and q/k/v biases (init 0) made random, so a mix-up would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)  # safetensors


@pytest.fixture(scope="module", params=sorted(SPECS))
def tiny(request, tmp_path_factory):
    """(spec name, checkpoint dir, torch model, our ModelConfig, our numpy params)."""
    spec = request.param
    path = tmp_path_factory.mktemp(spec)
    _write_tiny(spec, path)
    model = _torch_model(spec, path)
    cfg, params = load_hf_checkpoint(str(path))
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == cfg.tie_word_embeddings == ("lm_head" not in params) == SPECS[spec][2]["tie_word_embeddings"]
    return spec, path, model, cfg, params


@functools.lru_cache(maxsize=None)
def _forward(cfg, moa, routing):
    model = MoATransformer(cfg, moa)

    @jax.jit
    def forward(params, tokens, mask, positions, expert_idx):
        return model.apply({"params": params}, tokens, attention_mask=mask, positions=positions, routing=routing,
                           expert_idx=expert_idx)[0]
    return forward


def _ours(cfg, params, tokens, mask=None, *, moa=None, routing="fixed", expert_idx=None, positions=None):
    mask = np.ones_like(tokens) if mask is None else mask
    return np.asarray(_forward(cfg, moa, routing)(params, jnp.asarray(tokens), jnp.asarray(mask),
                                                   None if positions is None else jnp.asarray(positions),
                                                   None if expert_idx is None else jnp.asarray(expert_idx)))


def _theirs(model, tokens, mask=None, positions=None) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.long),
                    position_ids=None if positions is None else torch.as_tensor(np.asarray(positions)))
    return out.logits.float().numpy()


def _max_diff(a, b, where=None) -> float:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(np.max(d if where is None else d[np.asarray(where, bool)]))


def _report(what: str, diff: float) -> float:
    print(f"[parity] {what}: max|diff| = {diff:.2e}")
    return diff


def _tokens(spec: str, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], (batch, SPECS[spec][3])).astype(np.int32)


def _padded(spec: str, side: str):
    """(tokens, mask) for 3 rows of lengths T, T-5, T-11, padded on `side` with pad id 0."""
    tokens = _tokens(spec, 3, seed=1)
    t = tokens.shape[1]
    mask = np.zeros_like(tokens)
    for row, n in enumerate((t, t - 5, t - 11)):
        if side == "left":
            mask[row, t - n:] = 1
        else:
            mask[row, :n] = 1
    return np.where(mask == 1, tokens, 0), mask


def test_tiny_logits_parity(tiny):
    spec, _, model, cfg, params = tiny
    tokens = _tokens(spec, 2)
    ref = _theirs(model, tokens)
    assert _report(f"{spec} base model", _max_diff(_ours(cfg, params, tokens), ref)) <= TOL
    full = merge_params(params, init_trainable(cfg, MOA, jax.random.PRNGKey(1)))
    base = _ours(cfg, full, tokens, moa=MOA, routing="base")
    assert _report(f"{spec} MoA 'base'", _max_diff(base, ref)) <= TOL
    fixed = _ours(cfg, full, tokens, moa=MOA, routing="fixed", expert_idx=np.array([1, 3], np.int32))
    assert _report(f"{spec} MoA 'fixed' (fresh experts)", _max_diff(fixed, ref)) <= TOL


def test_tiny_left_padding(tiny):
    """Pads first (mask 0); transformers gets explicit position_ids = cumsum(mask) - 1, ours derives them."""
    spec, _, model, cfg, params = tiny
    tokens, mask = _padded(spec, "left")
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    ref = _theirs(model, tokens, mask, positions)
    diff = _max_diff(_ours(cfg, params, tokens, mask), ref, where=mask)
    assert _report(f"{spec} left padding (real tokens)", diff) <= TOL
    # the padded rows agree with the same rows run alone, unpadded (torch), so padding really was neutral
    for row in (1, 2):
        alone = _theirs(model, tokens[row:row + 1, mask[row] == 1])
        assert _max_diff(ref[row, mask[row] == 1], alone[0]) <= TOL


def test_tiny_right_padding(tiny):
    spec, _, model, cfg, params = tiny
    tokens, mask = _padded(spec, "right")
    ref = _theirs(model, tokens, mask)
    diff = _max_diff(_ours(cfg, params, tokens, mask), ref, where=mask)
    assert _report(f"{spec} right padding (real tokens)", diff) <= TOL


def test_llama3_rope_scaling_matters(tmp_path):
    """The scaled frequencies change the logits (torch and ours), and ours follow torch's scaled model."""
    spec = "llama_gqa_llama3_untied"
    _write_tiny(spec, tmp_path)
    cfg, params = load_hf_checkpoint(str(tmp_path))
    assert cfg.rope_scaling is not None and cfg.rope_scaling.original_max_position_embeddings < SPECS[spec][3]
    tokens = _tokens(spec, 1)
    scaled = _theirs(_torch_model(spec, tmp_path), tokens)
    plain = _theirs(_torch_model(spec, tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                    tokens)
    late = slice(cfg.rope_scaling.original_max_position_embeddings, None)  # positions past the original context
    effect = _report(f"{spec} torch with vs without rope scaling (sensitivity)",
                     _max_diff(scaled[:, late], plain[:, late]))
    assert effect > 100 * TOL, "rope scaling has no effect in this test"
    ours = _ours(cfg, params, tokens)
    assert _report(f"{spec} positions >= original_max_position_embeddings",
                   _max_diff(ours[:, late], scaled[:, late])) <= TOL
    ours_plain = _ours(replace(cfg, rope_scaling=None), params, tokens)
    assert _max_diff(ours_plain, plain) <= TOL


def test_mistral_sliding_window_matters(tmp_path):
    """transformers (eager) applies the window: without it, logits before position WINDOW are unchanged and
    later ones move; ours follow the windowed model, and drop to the unwindowed one without the window."""
    spec = "mistral_window_gqa_untied"
    _write_tiny(spec, tmp_path)
    cfg, params = load_hf_checkpoint(str(tmp_path))
    assert cfg.sliding_window == WINDOW < SPECS[spec][3]
    tokens = _tokens(spec, 2)
    windowed = _theirs(_torch_model(spec, tmp_path), tokens)
    full = _theirs(_torch_model(spec, tmp_path, sliding_window=None), tokens)
    assert _max_diff(windowed[:, :WINDOW], full[:, :WINDOW]) <= 1e-6
    effect = _report(f"{spec} torch with vs without window (sensitivity)",
                     _max_diff(windowed[:, WINDOW:], full[:, WINDOW:]))
    assert effect > 100 * TOL, "transformers ignored sliding_window"
    ours = _ours(cfg, params, tokens)
    assert _report(f"{spec} window {WINDOW} < T={SPECS[spec][3]}", _max_diff(ours, windowed)) <= TOL
    ours_full = _ours(replace(cfg, sliding_window=None), params, tokens)
    assert _max_diff(ours_full, full) <= TOL and _max_diff(ours_full, ours) > 100 * TOL


# ------------------------------------------------------------------------------------- embedded SmolLM2

@pytest.fixture(scope="module")
def smol():
    """Our base model (moa=None), float32, with its GGUF-built tokenizer."""
    return load_model(DEFAULT_MODEL, dtype="float32")


@pytest.fixture(scope="module")
def smol_torch():
    """transformers' own GGUF loading of the same file (its dequantise + q/k un-permute), float32."""
    path = resolve_source(DEFAULT_MODEL)[1]
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "Ünïcödé café — 日本語 and emoji 🤗: 1234 + 5678 ="]


def test_smollm2_logits_match_transformers_gguf(smol, smol_torch):
    """Several prompts, one of them chat-templated, run as one LEFT-padded batch on our side."""
    seqs = [smol.tokenizer(p)["input_ids"] for p in PROMPTS]
    seqs.append(smol.encode_prompt("What is 12 + 30? Answer briefly."))  # chat template, default system prompt
    t = max(map(len, seqs))
    tokens = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros_like(tokens)
    for row, s in enumerate(seqs):
        tokens[row, t - len(s):], mask[row, t - len(s):] = s, 1
    ours = smol.logits(tokens, attention_mask=mask, routing="base")
    worst = 0.0
    for row, s in enumerate(seqs):
        ref = _theirs(smol_torch, [s])[0]
        diff = _max_diff(ours[row, t - len(s):], ref)
        _report(f"SmolLM2 GGUF prompt {row} ({len(s)} tokens)", diff)
        assert np.array_equal(ours[row, t - len(s):].argmax(-1), ref.argmax(-1))
        worst = max(worst, diff)
    assert worst <= GGUF_TOL


def test_smollm2_greedy_generation_matches_transformers(smol, smol_torch):
    """20 greedy tokens: our batched (left-padded, KV-cached) generate vs torch generate, prompt by prompt."""
    prompts = ["Write a short story about a robot who learns to paint.", "What is 2 + 2?"]
    gens = smol.generate(prompts, max_new_tokens=20, routing="base")
    eos = sorted({smol.tokenizer.eos_token_id, smol.tokenizer.convert_tokens_to_ids("<|im_end|>")})
    full_length = 0
    for prompt, gen in zip(prompts, gens):
        ids = smol.encode_prompt(prompt)
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=20, eos_token_id=eos,
                                  pad_token_id=smol.tokenizer.pad_token_id)
        with torch.no_grad():
            out = smol_torch.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      generation_config=config)
        new = out[0, len(ids):].tolist()
        cut = next((i for i, tok in enumerate(new) if tok in eos), len(new))  # ours stop before the EOS
        print(f"[parity] SmolLM2 greedy {prompt!r}: {len(gen.token_ids)} tokens, torch {new[:cut]}")
        assert list(gen.token_ids) == new[:cut], (gen.text, smol.tokenizer.decode(new))
        assert gen.expert == -1 and gen.text == smol.tokenizer.decode(new[:cut], skip_special_tokens=True)
        full_length = max(full_length, len(gen.token_ids))
    assert full_length == 20, "no prompt produced 20 tokens: the comparison is too short"


def test_smollm2_kv_cache_matches_full_forward(smol):
    """Prefill a left-padded batch, then 5 one-token steps: each step's logits equal the full forward's."""
    cfg, params, steps = smol.config, smol.params, 5
    prompts = [smol.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    p = max(map(len, prompts))
    rng = np.random.default_rng(0)
    total = p + steps
    tokens = np.zeros((2, total), np.int32)
    mask = np.zeros_like(tokens)
    for row, s in enumerate(prompts):
        tokens[row, p - len(s):p], mask[row, p - len(s):] = s, 1
    tokens[:, p:] = rng.integers(0, cfg.vocab_size, (2, steps))
    model = MoATransformer(cfg, None)
    full = np.asarray(jax.jit(lambda pr, x, m: model.apply({"params": pr}, x, attention_mask=m)[0])(
        params, tokens, mask))

    step_fn = jax.jit(lambda pr, x, m, c: model.apply({"params": pr}, x, attention_mask=m, cache=c))
    logits, aux = step_fn(params, tokens[:, :p], mask[:, :p], init_cache(cfg, 2, total))
    diffs = [_max_diff(logits, full[:, :p], where=mask[:, :p])]
    cache = aux["cache"]
    for i in range(p, total):
        logits, aux = step_fn(params, tokens[:, i:i + 1], mask[:, i:i + 1], cache)
        cache = aux["cache"]
        diffs.append(_max_diff(logits[:, 0], full[:, i]))
    assert int(cache["index"]) == total
    print(f"[parity] SmolLM2 KV cache: prefill {diffs[0]:.2e}, steps {[f'{d:.1e}' for d in diffs[1:]]}")
    assert max(diffs) <= TOL


# ------------------------------------------------------------------------------- docs/example_api.py

def test_example_api_runs():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "docs", "example_api.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    print(out)
    assert re.search(r"^logits \(forced, expert 2\): \(1, \d+, 49152\)$", out, re.M), out
    # fresh experts (lora_b = 0): every routing gives the base model's logits
    diffs = [float(x) for x in re.findall(r"^max \|\w+ - base\| = (\S+)$", out, re.M)]
    assert len(diffs) == 2 and max(diffs) == 0.0, out
    gens = re.findall(r"^\[expert (\d)\] (.*)$", out, re.M)
    assert len(gens) == 2 and all(0 <= int(e) < 4 for e, _ in gens), out
