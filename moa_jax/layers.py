"""Building blocks of the Llama-family decoder, numerically matching Hugging Face transformers: RMSNorm,
rotary embeddings (incl. `rope_scaling` types llama3 and linear), grouped-query attention with padding masks, a
sliding window and a KV cache, and the SwiGLU MLP. Every projection is an `AdaptedDense`, so any of them can carry
MoA experts.

Shape glossary: B batch, T new tokens, S cache slots (or T without cache), D model width, F MLP width,
H query heads, K key/value heads, G = H / K query heads per kv head, Dh head width.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from moa_jax.config import ATTENTION_PROJECTIONS, ModelConfig, MoAConfig
from moa_jax.lora import AdaptedDense, Route

Array = jax.Array
NEG_INF = float(np.finfo(np.float32).min)


def jnp_dtype(name: str):
    return jnp.dtype(name)


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[Dh/2] inverse frequencies, with HF's llama3 / linear `rope_scaling` applied."""
    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    rs = cfg.rope_scaling
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


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
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
        dtype=jnp_dtype(cfg.dtype), param_dtype=jnp_dtype(cfg.param_dtype),
        adapter_dtype=jnp_dtype(moa.adapter_dtype) if moa is not None else jnp.float32, quantize=cfg.quantize)


def attention_mask(q_slots: Array, kv_slots: Array, kv_valid: Array, window: Optional[int]) -> Array:
    """Boolean [B, 1, 1, T, S]: causal over slot indices, valid (non-pad) keys, optional sliding window.

    q_slots [T] / kv_slots [S]: slot index of each query / key; kv_valid [B, S].
    """
    allowed = kv_slots[None, :] <= q_slots[:, None]                                # (T, S)
    if window is not None:
        allowed &= (q_slots[:, None] - kv_slots[None, :]) < window
    return allowed[None, None, None] & kv_valid[:, None, None, None, :].astype(bool)


class Attention(nn.Module):
    """Grouped-query self-attention. With a cache, new k/v are written at slot `cache_index` first."""
    cfg: ModelConfig
    moa: Optional[MoAConfig] = None

    @nn.compact
    def __call__(self, x: Array, route: Route, positions: Array, kv_valid: Array, cache_index: Array,
                 cache_kv: Optional[tuple[Array, Array]], deterministic: bool = True):
        cfg = self.cfg
        b, t, _ = x.shape
        h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_name, k_name, v_name, o_name = ATTENTION_PROJECTIONS
        q = _projection(cfg, self.moa, q_name, h * dh, cfg.attention_bias)(x, route, deterministic)
        kk = _projection(cfg, self.moa, k_name, k * dh, cfg.attention_bias)(x, route, deterministic)
        v = _projection(cfg, self.moa, v_name, k * dh, cfg.attention_bias)(x, route, deterministic)
        inv_freq = rope_inverse_frequencies(cfg)
        q = apply_rope(q.reshape(b, t, h, dh), positions, inv_freq)                  # (B, T, H, Dh)
        kk = apply_rope(kk.reshape(b, t, k, dh), positions, inv_freq)                # (B, T, K, Dh)
        v = v.reshape(b, t, k, dh)                                                   # (B, T, K, Dh)

        if cache_kv is not None:  # write the new keys/values into the cache, attend over all S slots
            cache_k, cache_v = cache_kv                                              # (B, S, K, Dh)
            kk = jax.lax.dynamic_update_slice(cache_k, kk.astype(cache_k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
            new_cache = (kk, v)
        else:
            new_cache = None
        s = kk.shape[1]
        q_slots = cache_index + jnp.arange(t)
        mask = attention_mask(q_slots, jnp.arange(s), kv_valid, cfg.sliding_window)  # (B, 1, 1, T, S)

        qg = q.reshape(b, t, k, h // k, dh)                                          # (B, T, K, G, Dh)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, kk.astype(q.dtype)).astype(jnp.float32)
        scores = jnp.where(mask, scores / math.sqrt(dh), NEG_INF)                    # (B, K, G, T, S)
        scores = checkpoint_name(scores, "attn_scores")                             # (model.saved_residuals)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype)).reshape(b, t, h * dh)
        out = checkpoint_name(out, "attn_out")  # o_proj's input, for its LoRA's dA (model.saved_residuals)
        out = _projection(cfg, self.moa, o_name, cfg.hidden_size)(out, route, deterministic)
        return out, new_cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    cfg: ModelConfig
    moa: Optional[MoAConfig] = None

    @nn.compact
    def __call__(self, x: Array, route: Route, deterministic: bool = True) -> Array:
        cfg = self.cfg
        gate = _projection(cfg, self.moa, "gate_proj", cfg.intermediate_size)(x, route, deterministic)
        up = _projection(cfg, self.moa, "up_proj", cfg.intermediate_size)(x, route, deterministic)
        return _projection(cfg, self.moa, "down_proj", cfg.hidden_size)(nn.silu(gate) * up, route, deterministic)
