"""Building blocks of the Llama-family decoder, numerically matching Hugging Face transformers: RMSNorm (Gemma's
(1 + w) form too), rotary embeddings (incl. `rope_scaling` types llama3 and linear), grouped-query attention with
padding masks, optional per-head q/k norms (Qwen3, Gemma 3), a sliding window and a KV cache
(`jax.nn.dot_product_attention`: cuDNN flash attention on GPU for right-padded rows, XLA in query blocks elsewhere;
neither keeps [T, S] scores for the backward), and the gated MLP (SwiGLU, or Gemma's tanh-GELU GeGLU). Every
projection is an `AdaptedDense`, so any of them can carry MoA experts.

Layers of different kinds (ModelConfig.layer_types: Gemma 3's sliding and global layers) are one scanned stack, so
a layer's kind is data, not Python: `layer_attention_tables` gives each layer's RoPE frequencies [L, Dh/2] and
window [L], and the scan hands layer l its row (FULL_WINDOW for a global layer: a mask term that is always true).

Shape glossary: B batch, T new tokens, S cache slots (or T without cache), D model width, F MLP width,
H query heads, K key/value heads, Dh head width, Tq queries per attention block.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from moa_jax.config import ATTENTION_PROJECTIONS, ModelConfig, MoAConfig
from moa_jax.nn.lora import AdaptedDense, Route

Array = jax.Array


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale. unit_offset (Gemma3RMSNorm): scale by
    (1 + w) in float32 and cast last; w starts at zero, so a fresh norm is the identity either way."""
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return ((1.0 + scale.astype(jnp.float32)) * x32).astype(self.dtype)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def norm(cfg: ModelConfig, name: str) -> RMSNorm:
    """The config's RMSNorm (Llama or Gemma form) under `name`."""
    return RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), cfg.norm_unit_offset,
                   name=name)


def rope_inverse_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """[Dh/2] inverse frequencies, with HF's llama3 / linear `rope_scaling` applied. local: those of a sliding
    layer, which has its own unscaled base when cfg.rope_local_theta is set (Gemma 3)."""
    dh = cfg.head_dim
    local = local and cfg.rope_local_theta is not None
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    rs = None if local else cfg.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32)
    if rs.rope_type == "linear":
        return (inv_freq / rs.factor).astype(np.float32)
    # llama3: long wavelengths scaled by 1/factor, short kept, a smooth blend in between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


# The window of a global layer in a per-layer stack: further back than any sequence, so the mask term is true.
FULL_WINDOW = 2 ** 30


def layer_attention_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """-> (inverse frequencies [L, Dh/2] f32, window [L] int32) of each layer by cfg.layer_types: what the scanned
    stack hands layer l when the layers differ in kind (module docstring)."""
    local = [t == "sliding_attention" for t in cfg.layer_types]
    freqs = np.stack([rope_inverse_frequencies(cfg, local=is_local) for is_local in local])          # (L, Dh/2)
    windows = np.array([cfg.sliding_window if is_local else FULL_WINDOW for is_local in local], np.int32)  # (L,)
    return freqs, windows


def apply_rope(x: Array, positions: Array, inv_freq) -> Array:
    """x [B, T, N, Dh], positions [B, T] -> rotated x (HF rotate-half convention)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)     # (B, T, Dh/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]                 # (B, T, 1, Dh)
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _projection(cfg: ModelConfig, moa: Optional[MoAConfig], name: str, features: int, use_bias: bool = False):
    adapted = moa is not None and name in moa.targets
    return AdaptedDense(
        features=features, use_bias=use_bias, name=name,
        num_experts=moa.num_experts if adapted else 0, rank=moa.rank if adapted else 0,
        scale=moa.scale if adapted else 1.0, dropout=moa.dropout if adapted else 0.0,
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        adapter_dtype=jnp.dtype(moa.adapter_dtype) if moa is not None else jnp.float32, quantize=cfg.quantize)


# Queries per block of the XLA attention: bounds its transient [B, H, Tq, S] f32 scores (a 7B layer at 8 x 2048:
# 1 GiB per block of 512 instead of 4 GiB for the whole sequence).
ATTENTION_QUERY_BLOCK = 512


def attention_mask(q_slots: Array, kv_slots: Array, kv_valid: Array, window,
                   segment_ids: Optional[Array] = None) -> Array:
    """Boolean [B, 1, T, S]: causal over slot indices, valid (non-pad) keys, optional sliding window, and with
    segment_ids [B, S] (packed rows, no cache: slots are token indices) only keys of the query's own segment.

    q_slots [T] / kv_slots [S]: slot index of each query / key; kv_valid [B, S]; window: None, an int or a traced
    int32 scalar (this layer's row of layer_attention_tables).
    """
    allowed = kv_slots[None, :] <= q_slots[:, None]                                # (T, S)
    if window is not None:
        allowed &= (q_slots[:, None] - kv_slots[None, :]) < window
    mask = allowed[None, None] & kv_valid[:, None, None, :].astype(bool)
    if segment_ids is not None:
        q_seg = jnp.take(segment_ids, q_slots, axis=1, mode="clip")                  # (B, T)
        mask &= (q_seg[:, :, None] == segment_ids[:, None, :])[:, None]
    return mask


def xla_attention(q: Array, k: Array, v: Array, q_slots: Array, kv_valid: Array, window,
                  segment_ids: Optional[Array] = None, scale: Optional[float] = None) -> Array:
    """q [B, T, H, Dh] at consecutive slots q_slots [T], k/v [B, S, K, Dh] -> [B, T, H, Dh] with
    `jax.nn.dot_product_attention` (XLA), in blocks of ATTENTION_QUERY_BLOCK queries. Each block is a
    `jax.checkpoint` that keeps only its inputs: whatever remat policy wraps the layer, no [T, S] scores or
    probabilities are kept for the backward (they are recomputed there, one block at a time). scale: of the
    scores (None: Dh**-0.5)."""
    kv_slots = jnp.arange(k.shape[1])

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def block(qb, slots):
        mask = attention_mask(slots, kv_slots, kv_valid, window, segment_ids)       # (B, 1, Tq, S)
        return jax.nn.dot_product_attention(qb, k, v, mask=mask, scale=scale, implementation="xla")

    b, t, h, dh = q.shape
    if t <= ATTENTION_QUERY_BLOCK:
        return block(q, q_slots)
    n = -(-t // ATTENTION_QUERY_BLOCK)
    pad = n * ATTENTION_QUERY_BLOCK - t  # padded queries get slots past the end; their rows are dropped below
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, ATTENTION_QUERY_BLOCK, h, dh)
    sp = (q_slots[0] + jnp.arange(n * ATTENTION_QUERY_BLOCK)).reshape(n, ATTENTION_QUERY_BLOCK)
    out = jax.lax.map(lambda xs: block(*xs), (jnp.moveaxis(qp, 1, 0), sp))          # (n, B, Tq, H, Dh)
    return jnp.moveaxis(out, 0, 1).reshape(b, n * ATTENTION_QUERY_BLOCK, h, dh)[:, :t]


def cudnn_attention(q: Array, k: Array, v: Array, kv_valid: Array, window,
                    scale: Optional[float] = None) -> Optional[Array]:
    """cuDNN flash attention for RIGHT-padded rows without a cache (training, NLL), or None when it does not apply
    (not a GPU, f32, or shapes cuDNN rejects). Causal + key lengths = the number of valid keys: with right padding
    no real query can see a pad key. The backward keeps only q, k, v, the output and a [B, H, T] logsumexp."""
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    if window is not None and not isinstance(window, int):
        return None  # a per-layer (traced) window: cuDNN takes only a static one
    # >= 1: an all-padding row (the filler rows of a last batch) must attend somewhere, or its softmax is 0/0 = NaN
    lengths = jnp.maximum(jnp.sum(kv_valid.astype(jnp.int32), axis=1), 1)            # (B,)
    try:
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation="cudnn", scale=scale,
            local_window_size=None if window is None else (window - 1, 0))
    except (NotImplementedError, ValueError, RuntimeError):  # raised while tracing: unsupported shape or cuDNN
        return None


class Attention(nn.Module):
    """Grouped-query self-attention. With a cache, new k/v are written at slot `cache_index` first.

    right_padded: the rows' padding is all at the end (the training / evaluation batches), which lets a GPU use
    cuDNN flash attention; left-padded rows (prompts, generation), cached decoding and packed rows (segment_ids
    [B, T]: attention inside each segment only) use `xla_attention`. layer_table: this layer's (inverse RoPE
    frequencies [Dh/2], window scalar) when the layers differ in kind (cfg.layer_types), else None."""
    cfg: ModelConfig
    moa: Optional[MoAConfig] = None

    @nn.compact
    def __call__(self, x: Array, route: Route, positions: Array, kv_valid: Array, cache_index: Array,
                 cache_kv: Optional[tuple[Array, Array]], deterministic: bool = True, right_padded: bool = False,
                 segment_ids: Optional[Array] = None, layer_table: Optional[tuple[Array, Array]] = None):
        cfg = self.cfg
        b, t, _ = x.shape
        h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_name, k_name, v_name, o_name = ATTENTION_PROJECTIONS
        q = _projection(cfg, self.moa, q_name, h * dh, cfg.attention_bias)(x, route, deterministic)
        kk = _projection(cfg, self.moa, k_name, k * dh, cfg.attention_bias)(x, route, deterministic)
        v = _projection(cfg, self.moa, v_name, k * dh, cfg.attention_bias)(x, route, deterministic)
        q, kk = q.reshape(b, t, h, dh), kk.reshape(b, t, k, dh)                     # (B, T, H|K, Dh)
        if cfg.qk_norm:  # per head, before RoPE (Qwen3, Gemma 3)
            q, kk = norm(cfg, "q_norm")(q), norm(cfg, "k_norm")(kk)
        if layer_table is None:
            inv_freq, window = rope_inverse_frequencies(cfg), cfg.sliding_window
        else:
            inv_freq, window = layer_table                                           # (Dh/2,), ()
        q = apply_rope(q, positions, inv_freq)                                       # (B, T, H, Dh)
        kk = apply_rope(kk, positions, inv_freq)                                     # (B, T, K, Dh)
        v = v.reshape(b, t, k, dh)                                                   # (B, T, K, Dh)

        if cache_kv is not None:  # write the new keys/values into the cache, attend over all S slots
            cache_k, cache_v = cache_kv                                              # (B, S, K, Dh)
            kk = jax.lax.dynamic_update_slice(cache_k, kk.astype(cache_k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
            new_cache = (kk, v)
        else:
            new_cache = None
        kq, vq = kk.astype(q.dtype), v.astype(q.dtype)                               # (B, S, K, Dh)
        scale = None if cfg.query_pre_attn_scalar is None else float(cfg.query_pre_attn_scalar) ** -0.5
        out = None
        if right_padded and cache_kv is None and segment_ids is None:
            out = cudnn_attention(q, kq, vq, kv_valid, window, scale)
        if out is None:
            scaled = {} if scale is None else {"scale": scale}  # the Llama call keeps its exact signature
            out = xla_attention(q, kq, vq, cache_index + jnp.arange(t), kv_valid, window,
                                segment_ids=segment_ids, **scaled)
        out = checkpoint_name(out.reshape(b, t, h * dh), "attn_out")  # o_proj's input, for its LoRA's dA
        out = _projection(cfg, self.moa, o_name, cfg.hidden_size)(out, route, deterministic)
        return out, new_cache


_ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); act = silu (SwiGLU) or tanh-approximated GELU (Gemma's GeGLU,
    HF gelu_pytorch_tanh)."""
    cfg: ModelConfig
    moa: Optional[MoAConfig] = None

    @nn.compact
    def __call__(self, x: Array, route: Route, deterministic: bool = True) -> Array:
        cfg = self.cfg
        gate = _projection(cfg, self.moa, "gate_proj", cfg.intermediate_size)(x, route, deterministic)
        up = _projection(cfg, self.moa, "up_proj", cfg.intermediate_size)(x, route, deterministic)
        act = _ACTIVATIONS[cfg.hidden_act]
        return _projection(cfg, self.moa, "down_proj", cfg.hidden_size)(act(gate) * up, route, deterministic)
