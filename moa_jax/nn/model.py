"""The MoA decoder: a Llama-family transformer (Llama 2/3, Mistral, Qwen2, SmolLM2, Qwen3, Gemma 3 text) whose
projections carry stacked LoRA experts and whose every layer has its own router. Layers are scanned (`nn.scan`),
so every per-layer parameter has a leading L axis and compile time is flat in depth. Gemma 3's sliding and global
layers stay one stack: each layer's window and RoPE frequencies are scanned with it (layers.layer_attention_tables).

Family differences, all static config (ModelConfig), so each family compiles one program:
  Qwen3     attn/{q,k}_norm (per-head RMSNorm before RoPE), head_dim not D/H.
  Gemma 3   the above, RMSNorm (1 + w); embeddings times sqrt(D); four norms per layer: h + post_attn_norm(attn(
            input_norm(h))), then h + post_ffn_norm(mlp(pre_ffn_norm(h))) (Llama: post_attn_norm is the MLP's
            pre-norm, there are no output norms); GeGLU; attention scale query_pre_attn_scalar**-0.5.

Param tree (kernels are [Din, Dout]; `lora_*` and `router` exist only with a MoAConfig, on its targets):
  embed/embedding [V, D]
  layers/input_norm/scale [L, D]              layers/post_attn_norm/scale [L, D]
  layers/{pre,post}_ffn_norm/scale [L, D]     (sandwich_norms)    layers/attn/{q,k}_norm/scale [L, Dh] (qk_norm)
  layers/attn/{q,k,v,o}_proj/kernel [L, Din, Dout]   (+ bias [L, Dout] for q/k/v with attention_bias)
  layers/mlp/{gate,up,down}_proj/kernel [L, Din, Dout]
  layers/<...>/<proj>/lora_a [L, E, Din, R]   layers/<...>/<proj>/lora_b [L, E, R, Dout]
  layers/router/kernel [L, D, E]              (mlp router: layers/router/{hidden,out}/kernel)
  final_norm/scale [D]                        lm_head/kernel [D, V] (absent with tied embeddings)

Routing modes (static `routing` argument of __call__; moa_jax.routing.MODES, translated from the user's and the
training stage's routings by moa_jax.routing.resolve; the layers read each mode's flags, routing.MODE_SPECS):
  base    the frozen base model, adapters off.
  fixed   top-1 per sequence with a given expert_idx [B]: domain labels in training (teacher forcing), the
          oracle / a forced expert / the decided expert at inference.
  self    top-1 per sequence, each layer using its own router's argmax (the routing pass over a prompt).
  probe   the frozen base model, adapters off, with every layer's router read on the base hidden state entering
          it (normalised, pooled as always): the servable routing pass of MoAConfig.route_on='probe'.
  soft    per-sequence mixture with each layer's softmax(router) as gates.
  token   token-level top-k MoE-LoRA baseline with a load-balancing loss.
Router logits are computed in every mode but `base` (pooled over prompt tokens) and returned per layer. Packed
rows (segment_ids, moa_jax/data/packing.py) pool every segment's prompt on its own.

KV cache: {"k", "v": [L, B, S, K, Dh], "valid": [B, S] bool, "index": int32 scalar (next free slot)}.

Shape glossary: B batch, T tokens, G segments of a packed row, S cache slots, D width, V vocab, L layers,
E experts, R rank, K kv heads, Dh head width.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moa_jax.config import ModelConfig, MoAConfig
from moa_jax.nn.layers import MLP, Attention, layer_attention_tables, norm
from moa_jax.nn.lm_loss import chunked_token_nll, vocab_logits
from moa_jax.nn.lora import Route
from moa_jax.nn.router import Router, load_balancing_loss, masked_mean_pool, segment_mean_pool, top_k_gates
from moa_jax.routing import mode_spec

Array = jax.Array

# REMAT POLICIES (ModelConfig.remat): what the backward keeps of each layer's forward. Attention never keeps its
# [T, S] scores or probabilities under any policy (cuDNN keeps a [B, H, T] logsumexp; the XLA path recomputes its
# query blocks, layers.xla_attention), so the memory below is linear in T.
#   full         only the layer input [B, T, D]: everything is recomputed in the backward (one extra forward of
#                each layer: +8-13% step time on cpu-tiny). Least memory: what the default picks on accelerators,
#                where a 7-8B model at 8 x 2048 needs it (33.5 GiB against 75.3 GiB; BENCHMARKS.md "Scale").
#   projections  every projection's output ("proj", after its LoRA delta), the attention output (o_proj's input,
#                which only a LoRA's dA needs), the LoRA ranks' activations ("lora_h", [.., R]) and the 64 key bits
#                of each dropout mask (lora.dropout_bits rebuilds the mask from them with a cheap hash); norms,
#                rotary, attention, SwiGLU and the other projections' inputs are recomputed. ~2 (4D + 3F) bytes per
#                token and layer in bf16: fastest on CPU, where the default picks it (measured on cpu-tiny,
#                BENCHMARKS.md).
#   none         no rematerialisation: every residual autodiff wants (the most memory).
#   auto         projections on CPU, full on GPU / TPU.
_SAVED_NAMES = jax.checkpoint_policies.save_only_these_names("proj", "attn_out", "lora_h")


def saved_residuals(prim, *args, **params) -> bool:
    """jax.checkpoint policy of the scanned layer under remat='projections' (see above)."""
    return prim.name == "random_bits" or _SAVED_NAMES(prim, *args, **params)


def resolve_remat(remat: str) -> str:
    """ModelConfig.remat -> 'full' | 'projections' | 'none' ('auto' by the default backend)."""
    if remat == "auto":
        return "projections" if jax.default_backend() == "cpu" else "full"
    return remat


def remat_layer(remat: str):
    """The decoder layer class wrapped for ModelConfig.remat."""
    policy = resolve_remat(remat)
    if policy == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, prevent_cse=False, policy=saved_residuals if policy == "projections" else None)


class LMHead(nn.Module):
    """The untied output projection; returns its kernel [D, V] (applied by lm_loss.vocab_logits)."""
    features: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, width: int) -> Array:
        return self.param("kernel", nn.initializers.lecun_normal(), (width, self.features), self.param_dtype)


class DecoderLayer(nn.Module):
    """One pre-norm block: router -> attention -> MLP, all adapters sharing this layer's route."""
    cfg: ModelConfig
    moa: Optional[MoAConfig]
    routing: str
    deterministic: bool = True
    right_padded: bool = False
    num_segments: int = 0

    def _route(self, x: Array, prompt_mask: Array, expert_idx: Array, token_mask: Array, segments):
        """-> (pooled router logits [B, E] f32 ([B, G, E] per segment of packed rows), balance loss, Route)."""
        lead = x.shape[:1] if segments is None else (x.shape[0], segments[1])
        spec = mode_spec(self.routing)
        if self.moa is None or not spec.reads_routers:
            num_experts = 1 if self.moa is None else self.moa.num_experts
            return jnp.zeros((*lead, num_experts), jnp.float32), jnp.zeros((), jnp.float32), Route.off()
        router = Router(self.moa.num_experts, self.moa.router_type, self.moa.router_hidden,
                        param_dtype=jnp.dtype(self.moa.adapter_dtype), name="router")
        pooled = (masked_mean_pool(x, prompt_mask) if segments is None
                  else segment_mean_pool(x, prompt_mask, segments[0], segments[1]))      # (B, D) | (B, G, D)
        logits = router(pooled)                                                  # (B, E) | (B, G, E)
        zero = jnp.zeros((), jnp.float32)
        if not spec.adapters:                                                    # probe: routers read, base runs
            return logits, zero, Route.off()
        if spec.given_expert:
            return logits, zero, Route.top1(expert_idx)
        if spec.own_argmax:
            return logits, zero, Route.top1(jnp.argmax(logits, -1).astype(jnp.int32))
        if spec.sequence_gates:
            return logits, zero, Route.mixture(jax.nn.softmax(logits, -1))
        # token gates: every token routed by the same router, top-k, with a load-balancing loss
        gates, probs, chosen = top_k_gates(router(x), self.moa.top_k)            # (B, T, E)
        return logits, load_balancing_loss(probs, chosen, token_mask), Route.mixture(gates)

    @nn.compact
    def __call__(self, h: Array, shared: tuple, layer_cache: Optional[tuple[Array, Array]],
                 layer_table: Optional[tuple[Array, Array]] = None):
        """layer_table: this layer's (RoPE inverse frequencies [Dh/2], window []) when cfg.layer_types is set."""
        positions, kv_valid, cache_index, prompt_mask, expert_idx, token_mask, segment_ids = shared
        cfg = self.cfg
        segments = None if segment_ids is None else (segment_ids, self.num_segments)
        x = norm(cfg, "input_norm")(h)
        logits, balance, route = self._route(x, prompt_mask, expert_idx, token_mask, segments)
        attn_out, new_cache = Attention(cfg, self.moa, name="attn")(
            x, route, positions, kv_valid, cache_index, layer_cache, self.deterministic, self.right_padded,
            segment_ids, layer_table)
        mlp = MLP(cfg, self.moa, name="mlp")
        if cfg.sandwich_norms:  # Gemma: the block outputs are normed too
            h = h + norm(cfg, "post_attn_norm")(attn_out)
            h = h + norm(cfg, "post_ffn_norm")(mlp(norm(cfg, "pre_ffn_norm")(h), route, self.deterministic))
        else:
            h = h + attn_out
            h = h + mlp(norm(cfg, "post_attn_norm")(h), route, self.deterministic)
        return h, (logits, balance, new_cache)


class MoATransformer(nn.Module):
    """Decoder-only LM with MoA adapters. `moa=None` gives the plain base model."""
    cfg: ModelConfig
    moa: Optional[MoAConfig] = None

    @nn.compact
    def __call__(self, tokens: Array, *, attention_mask: Optional[Array] = None,
                 positions: Optional[Array] = None, prompt_mask: Optional[Array] = None,
                 routing: str = "fixed", expert_idx: Optional[Array] = None,
                 cache: Optional[dict] = None, deterministic: bool = True,
                 logits_at: Optional[Array] = None, nll_targets: Optional[Array] = None,
                 right_padded: bool = False, segment_ids: Optional[Array] = None,
                 num_segments: int = 0) -> tuple[Array, dict[str, Any]]:
        """tokens [B, T] -> (logits [B, T, V] float32, aux).

        logits_at [B, K]: compute logits only at these positions -> [B, K, V]. Training needs them only where
        the next token is a target; with a 49k vocabulary the LM head is ~20% of a step, so skipping the prompt
        positions is a real saving.

        aux: router_logits [L, B, E] f32, balance_loss scalar (token mode), cache (updated, or None).
        attention_mask [B, T]: 1 on real tokens (default all). prompt_mask [B, T]: tokens the routers pool
        (default: attention_mask). positions [B, T]: default counts real tokens only, so left padding is harmless.
        nll_targets [B, K] (with logits_at): return the NLL [B, K] f32 of these next tokens instead of logits,
        `cfg.loss_chunk` tokens at a time, never holding [B, K, V] logits (moa_jax/nn/lm_loss.py).
        right_padded: every row's padding is at its end (training and evaluation batches); lets a GPU use cuDNN
        flash attention. Leave it False for left-padded prompts.
        segment_ids [B, T] with num_segments G (packed rows, moa_jax/data/packing.py): 1..G per example, 0 on
        padding. Attention stays inside a segment, positions restart at each, and the routers pool each
        segment's prompt: router_logits are then [L, B, G, E]. One expert per row (fixed), base, probe or token
        routing only; no KV cache.
        """
        spec = mode_spec(routing)
        if spec.token_gates and self.moa is not None and self.moa.top_k > self.moa.num_experts:
            raise ValueError(f"routing='token' needs MoAConfig.top_k={self.moa.top_k} <= "
                             f"num_experts={self.moa.num_experts}")
        cfg = self.cfg
        b, t = tokens.shape
        attention_mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        prompt_mask = attention_mask if prompt_mask is None else prompt_mask
        if spec.given_expert and expert_idx is None and self.moa is not None:
            raise ValueError("routing='fixed' needs expert_idx [B] (the expert of each sequence)")
        expert_idx = jnp.zeros((b,), jnp.int32) if expert_idx is None else jnp.asarray(expert_idx, jnp.int32)
        if segment_ids is not None:
            if cache is not None or not spec.one_expert_per_row or num_segments < 1:
                raise ValueError(f"segment_ids (packed rows) needs num_segments >= 1 (got {num_segments}), no KV "
                                 f"cache, and one expert per row: routing 'fixed', 'base', 'probe' or 'token', "
                                 f"not {routing!r}")
            segment_ids = segment_ids.astype(jnp.int32)
            if positions is None:
                positions = segment_positions(segment_ids)
        if cache is not None:
            cache_index = cache["index"]
            past = jnp.sum(cache["valid"], axis=1, dtype=jnp.int32)[:, None]                  # (B, 1)
            kv_valid = jax.lax.dynamic_update_slice(cache["valid"], attention_mask.astype(bool), (0, cache_index))
            layer_cache = (cache["k"], cache["v"])
        else:
            cache_index, past, kv_valid, layer_cache = jnp.zeros((), jnp.int32), 0, attention_mask, None
        if positions is None:
            positions = jnp.maximum(past + jnp.cumsum(attention_mask, axis=1) - 1, 0)

        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.dtype(cfg.param_dtype), name="embed")
        h = embed(tokens)                                                                     # (B, T, D)
        if cfg.embed_scale:  # Gemma: sqrt(D), rounded to the compute dtype as HF rounds it to the weights'
            h = h * jnp.asarray(cfg.hidden_size ** 0.5, h.dtype)

        scanned = nn.scan(remat_layer(cfg.remat), variable_axes={"params": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast, 0, 0), length=cfg.num_layers)
        shared = (positions, kv_valid, cache_index, prompt_mask, expert_idx, attention_mask, segment_ids)
        # Per-layer kinds travel as scanned data ([L, Dh/2] frequencies, [L] windows), never as Python branches.
        tables = None
        if cfg.per_layer_attention:
            tables = tuple(jnp.asarray(a) for a in layer_attention_tables(cfg))
        layers = scanned(cfg, self.moa, routing, deterministic, right_padded, num_segments, name="layers")
        h, (router_logits, balance, new_kv) = layers(h, shared, layer_cache, tables)

        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[..., None].astype(jnp.int32), axis=1)                # (B, K, D)
        h = norm(cfg, "final_norm")(h)
        tied = cfg.tie_word_embeddings
        weight = embed.embedding if tied else LMHead(cfg.vocab_size, jnp.dtype(cfg.param_dtype), name="lm_head")(
            cfg.hidden_size)                                                                   # [V, D] / [D, V]
        if nll_targets is not None:
            if logits_at is None:
                raise ValueError("nll_targets needs logits_at (the positions whose next token they are)")
            out = chunked_token_nll(h, weight, nll_targets, tied=tied, dtype=jnp.dtype(cfg.dtype),
                                    chunk=cfg.loss_chunk)                                      # (B, K)
        else:
            out = vocab_logits(h, weight, tied=tied, dtype=jnp.dtype(cfg.dtype))               # (B, T, V)
        new_cache = None
        if cache is not None:
            new_cache = {"k": new_kv[0], "v": new_kv[1], "valid": kv_valid, "index": cache_index + t}
        return out, {"router_logits": router_logits, "balance_loss": jnp.mean(balance), "cache": new_cache}


def segment_positions(segment_ids: Array) -> Array:
    """[B, T] segment ids -> [B, T] positions counted from each segment's first token (padding continues from 0)."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype: Optional[str] = None) -> dict[str, Array]:
    """An empty KV cache with `slots` positions per sequence."""
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "valid": jnp.zeros((batch, slots), bool),
            "index": jnp.zeros((), jnp.int32)}
