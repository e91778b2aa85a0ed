"""Memory-safe attention and LM loss: parity with the previous implementations (materialised [B, K, G, T, S] scores,
full [B, K, V] logits) on the four architectures (Llama GQA, Qwen2 with q/k/v bias, Mistral with a sliding window
shorter than T, SmolLM2-style tied head), forward, gradients and KV-cache decoding; and no T^2 tensor among the
residuals the train step keeps for its backward, under every remat policy.

Shape glossary: B batch, T tokens, S kv slots, H heads, K kv heads, G = H / K, Dh head width, V vocab.
"""
import contextlib
import dataclasses
import functools
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from moa_jax.nn import layers
from moa_jax.config import ConfigError, ModelConfig, MoAConfig, TrainConfig
from moa_jax.nn.lm_loss import chunked_token_nll, token_nll, vocab_logits
from moa_jax.nn.model import MoATransformer, init_cache
from moa_jax.params import merge_params
from moa_jax.train.step import loss_fn
from tests.train_helpers import init_trees

B, T, V = 3, 24, 64
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
ARCHS = {
    "llama_gqa": ModelConfig(**BASE),
    "qwen2_bias": ModelConfig(**{**BASE, "num_kv_heads": 1}, attention_bias=True, tie_word_embeddings=True),
    "mistral_window": ModelConfig(**BASE, sliding_window=7),
    "smollm2_tied": ModelConfig(**{**BASE, "num_heads": 6, "num_kv_heads": 2, "hidden_size": 48},
                                tie_word_embeddings=True),
}
MOA = MoAConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0)
TCFG = TrainConfig(stage="stage2")


def old_attention(q, k, v, q_slots, kv_valid, window, segment_ids=None):
    """The implementation this library had before (kept here as the reference): f32 scores [B, K, G, T, S]
    masked with float32 min, softmax, probs in the compute dtype. No packed rows."""
    assert segment_ids is None
    b, t, h, dh = q.shape
    kh = k.shape[2]
    mask = layers.attention_mask(q_slots, jnp.arange(k.shape[1]), kv_valid, window)[:, :, None]   # (B,1,1,T,S)
    qg = q.reshape(b, t, kh, h // kh, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32)
    scores = jnp.where(mask, scores / math.sqrt(dh), float(np.finfo(np.float32).min))
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)


def batch(seed=0, left=False):
    """Rows of lengths T, T-5, T-11 (right-padded unless `left`), prompt = first half of each row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (B, T)).astype(np.int32)
    pos = np.arange(T)[None]
    lengths = np.array([T, T - 5, T - 11])[:, None]
    mask = (pos >= T - lengths) if left else (pos < lengths)
    start = (T - lengths) if left else 0
    prompt = mask & (pos < start + lengths // 2)
    loss = mask & ~prompt
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    return {"tokens": i32(np.where(mask, tokens, 0)), "attention_mask": i32(mask), "prompt_mask": i32(prompt),
            "loss_mask": i32(loss), "domain": i32([0, 2, 1]), "valid": i32([1, 1, 1])}


@functools.lru_cache(maxsize=None)
def trees(cfg):
    frozen, trainable = init_trees(cfg, MOA, seed=3)
    return jax.tree.map(jnp.asarray, frozen), jax.tree.map(jnp.asarray, trainable)


def loss_and_grads(cfg, data):
    frozen, trainable = trees(cfg)
    fn = functools.partial(loss_fn, model=MoATransformer(cfg, MOA), tcfg=TCFG, num_domains=3)
    (loss, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable, frozen, data, jax.random.PRNGKey(0))
    return loss, grads


def close(a, b, rel):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= rel * max(np.max(np.abs(b)), 1e-30), np.max(np.abs(a - b))


def forward_and_grads(cfg, right, left):
    """One compiled program: logits of a right- and a left-padded batch, and the stage-2 loss + its gradients."""
    frozen, trainable = trees(cfg)
    model = MoATransformer(cfg, MOA)
    loss = functools.partial(loss_fn, model=model, tcfg=TCFG, num_domains=3)

    def run(frozen, trainable, right, left):
        logits = [model.apply({"params": merge_params(frozen, trainable)}, d["tokens"],
                              attention_mask=d["attention_mask"], prompt_mask=d["prompt_mask"], routing="fixed",
                              expert_idx=d["domain"])[0] for d in (right, left)]
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(trainable, frozen, right, jax.random.PRNGKey(0))
        return logits, value, grads
    return jax.jit(run)(frozen, trainable, right, left)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_attention_matches_previous_implementation(arch, monkeypatch):
    """Forward logits (left- and right-padded rows) and stage-2 loss gradients: new attention (query blocks of 8,
    so T = 24 runs 3 blocks) vs the previous one, <= 1e-5 relative in f32."""
    cfg = ARCHS[arch]
    monkeypatch.setattr(layers, "ATTENTION_QUERY_BLOCK", 8)
    right, left = batch(0), batch(1, left=True)
    (new_logits, new_loss, new_grads) = forward_and_grads(cfg, right, left)
    monkeypatch.setattr(layers, "xla_attention", old_attention)
    (ref_logits, ref_loss, ref_grads) = forward_and_grads(cfg, right, left)
    for got, want, data in zip(new_logits, ref_logits, (right, left)):
        real = np.asarray(data["attention_mask"], bool)
        close(np.asarray(got)[real], np.asarray(want)[real], 1e-5)
    close(new_loss, ref_loss, 1e-5)
    jax.tree.map(lambda g, r: close(g, r, 1e-5), new_grads, ref_grads)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(new_grads))


@pytest.mark.parametrize("arch", ["mistral_window", "qwen2_bias"])
def test_kv_cache_decode_matches_previous_implementation(arch, monkeypatch):
    """Left-padded prefill into a cache, then 3 single-token steps (queries at slot cache_index): every step's
    logits equal the previous implementation's, <= 1e-5 relative."""
    cfg = ARCHS[arch]
    data = batch(2, left=True)
    frozen, trainable = trees(cfg)
    params = {"params": merge_params(frozen, trainable)}
    model = MoATransformer(cfg, MOA)
    step = jax.jit(lambda p, tok, mask, cache: model.apply(p, tok, attention_mask=mask, routing="fixed",
                                                           expert_idx=data["domain"], cache=cache))

    def decode():
        cache = init_cache(cfg, B, T + 3)
        logits, aux = step(params, data["tokens"], data["attention_mask"], cache)
        outs = [np.asarray(logits[:, -1])]
        for _ in range(3):
            nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
            logits, aux = step(params, nxt, jnp.ones((B, 1), jnp.int32), aux["cache"])
            outs.append(np.asarray(logits[:, -1]))
        return np.stack(outs)
    new = decode()
    monkeypatch.setattr(layers, "xla_attention", old_attention)
    close(new, decode(), 1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_nll_matches_full_logits(tied):
    """chunked_token_nll (blocks of 5 over 3 x 7 = 21 tokens: 5 blocks, the last padded) equals token_nll on the
    full logits, values and gradients w.r.t. the hidden states and the head weight, <= 1e-5 relative."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((3, 7, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((V, 16) if tied else (16, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (3, 7)), jnp.int32)
    weights = jnp.asarray(rng.random((3, 7)), jnp.float32)
    full = lambda h, w: jnp.sum(token_nll(vocab_logits(h, w, tied=tied, dtype=jnp.float32), targets) * weights)
    chunked = lambda h, w: jnp.sum(chunked_token_nll(h, w, targets, tied=tied, dtype=jnp.float32, chunk=5) * weights)
    (v1, g1), (v2, g2) = (jax.value_and_grad(f, argnums=(0, 1))(h, w) for f in (full, chunked))
    close(v2, v1, 1e-6)
    close(g2[0], g1[0], 1e-5)
    close(g2[1], g1[1], 1e-5)


def test_train_loss_chunked_equals_unchunked():
    """The stage-2 loss and its gradients with loss_chunk=4 (many blocks) equal one block, <= 1e-5 relative (the
    tied head here; test_chunked_nll_matches_full_logits covers both heads)."""
    cfg, data = ARCHS["smollm2_tied"], batch(4)
    one, grads_one = loss_and_grads(dataclasses.replace(cfg, loss_chunk=10 ** 6), data)
    many, grads_many = loss_and_grads(dataclasses.replace(cfg, loss_chunk=4), data)
    close(many, one, 1e-5)
    jax.tree.map(lambda g, r: close(g, r, 1e-5), grads_many, grads_one)


def _square_residuals(cfg, t):
    """Residuals of the stage-2 loss's backward with a T x T (or larger) footprint: >= 2 axes of size >= t."""
    frozen, trainable = trees(cfg)
    data = batch(0)
    fn = functools.partial(loss_fn, model=MoATransformer(cfg, MOA), tcfg=TCFG, num_domains=3)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda tr: fn(tr, frozen, data, jax.random.PRNGKey(0))[0], trainable)
    lines = out.getvalue().splitlines()
    assert any(re.match(r"\w+\[", line) for line in lines), lines  # lines like "f32[2,3,24,32] from ..."
    shapes = [(tuple(int(d) for d in m.group(1).split(",") if d), line) for line in lines
              if (m := re.match(r"\w+\[([\d,]*)\]", line))]
    return [line for shape, line in shapes if sum(d >= t for d in shape) >= 2]


@pytest.mark.parametrize("remat", ["full", "projections", "none"])
def test_no_t_squared_residuals(remat, monkeypatch):
    """Under every remat policy the backward keeps nothing of size T^2 (T = 24 > every other axis of this model;
    query blocks of 8, so the blocked path runs); the previous attention under remat='none' did keep its
    [B, K, G, T, S] probabilities, which shows the check can fail."""
    monkeypatch.setattr(layers, "ATTENTION_QUERY_BLOCK", 8)
    cfg = ModelConfig(vocab_size=20, hidden_size=16, intermediate_size=20, num_layers=2, num_heads=2,
                      num_kv_heads=1, remat=remat)
    assert _square_residuals(cfg, T) == []
    if remat == "none":
        monkeypatch.setattr(layers, "xla_attention", old_attention)
        assert _square_residuals(cfg, T), "the reference attention should keep T x S probabilities"


def test_cudnn_path_only_on_gpu_in_half_precision():
    """Elsewhere the layer falls back to xla_attention (what every other test here runs)."""
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    valid = jnp.ones((1, 4), bool)
    if jax.default_backend() != "gpu":
        assert layers.cudnn_attention(q, q, q, valid, None) is None
    assert layers.cudnn_attention(q.astype(jnp.float32), q.astype(jnp.float32), q.astype(jnp.float32), valid,
                                  None) is None


def test_remat_and_loss_chunk_are_validated():
    with pytest.raises(ConfigError, match=r"remat='fast' is not one of \('auto', 'full', 'projections', 'none'\)"):
        ModelConfig(**BASE, remat="fast")
    with pytest.raises(ConfigError, match="loss_chunk"):
        ModelConfig(**BASE, loss_chunk=0)
