"""An independent float64 numpy forward of the MoA decoder, written from the documented contract (model.py,
layers.py docstrings and Hugging Face Llama), for tests. Loops over layers and experts; no jax, no flax.

Shape glossary: B batch, T tokens, D width, H/K query/kv heads, Dh head width, E experts, L layers, V vocab.
"""
from __future__ import annotations

import numpy as np


def _rms(x, scale, eps):
    return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _rope(x, positions, theta):
    """x [B, T, N, Dh] rotated by positions [B, T] (rotate-half convention)."""
    dh = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
    ang = positions[..., None] * inv_freq                            # (B, T, Dh/2)
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, :, None], np.sin(np.concatenate([ang, ang], -1))[:, :, None]
    rotated = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], axis=-1)
    return x * cos + rotated * sin


def _margin(values, k, mask):
    """Smallest gap between the k-th and (k+1)-th largest entry (last axis) where mask: how far a top-k
    decision is from a tie."""
    s = -np.sort(-values, axis=-1)
    return float(np.min(np.where(mask, s[..., k - 1] - s[..., k], np.inf)))


def expert_weights(moa, routing, x, router_kernel, prompt_mask, token_mask, expert_idx):
    """-> (weights [B, T, E] per token, pooled router logits [B, E], balance loss, decision margin)."""
    b, t, _ = x.shape
    pm = prompt_mask[..., None]
    logits = (x * pm).sum(1) / np.maximum(pm.sum(1), 1.0) @ router_kernel          # (B, E)
    num_experts = router_kernel.shape[-1]
    balance, margin = 0.0, np.inf
    if routing == "fixed":
        w = np.eye(num_experts)[expert_idx]
    elif routing == "self":
        w = np.eye(num_experts)[np.argmax(logits, -1)]
        margin = _margin(logits, 1, True)
    elif routing == "soft":
        w = _softmax(logits)
    elif routing == "probe":   # adapters off; the routers only read the base hidden states
        w = np.zeros_like(logits)
    elif routing == "token":
        token_logits = x @ router_kernel                                              # (B, T, E)
        probs = _softmax(token_logits)
        top = np.argsort(-probs, axis=-1)[..., :moa.top_k]                           # (B, T, k)
        w = np.zeros_like(probs)
        np.put_along_axis(w, top, np.take_along_axis(probs, top, -1), -1)
        w = w / w.sum(-1, keepdims=True)
        n = token_mask.sum()
        frac = (np.eye(num_experts)[top] * token_mask[..., None, None]).sum((0, 1, 2)) / (n * moa.top_k)
        balance = num_experts * np.sum(frac * (probs * token_mask[..., None]).sum((0, 1)) / n)
        return w, logits, balance, _margin(token_logits, moa.top_k, token_mask > 0)
    else:
        raise ValueError(routing)
    return np.broadcast_to(w[:, None], (b, t, num_experts)), logits, balance, margin


def forward(cfg, moa, params, tokens, routing="base", expert_idx=None, attention_mask=None, prompt_mask=None):
    """-> (logits [B, T, V], router logits [L, B, E] (None in base mode), mean balance loss, decision margin:
    the smallest gap, over layers, between a chosen and an unchosen expert's score in modes 'self' (pooled
    logits) and 'token' (per-token logits at real tokens); inf otherwise)."""
    p = _to_numpy(params)
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    am = np.ones((b, t)) if attention_mask is None else np.asarray(attention_mask, np.float64)
    pm = am if prompt_mask is None else np.asarray(prompt_mask, np.float64)
    idx = np.zeros(b, int) if expert_idx is None else np.asarray(expert_idx)
    positions = np.maximum(np.cumsum(am, 1) - 1, 0)
    h_, k_, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    causal = np.tril(np.ones((t, t), bool))
    allowed = causal[None, None] & (am[:, None, None, :] > 0)                        # (B, 1, T, S)
    h = p["embed"]["embedding"][tokens]
    router_logits, balances, margin = [], [], np.inf
    for layer in range(cfg.num_layers):
        lp = _layer(p["layers"], layer)
        x = _rms(h, lp["input_norm"]["scale"], cfg.rms_norm_eps)
        w = None
        if moa is not None and routing != "base":
            w, logits, bal, m = expert_weights(moa, routing, x, lp["router"]["kernel"], pm, am, idx)
            margin = min(margin, m)
            router_logits.append(logits)
            balances.append(bal)

        def proj(group, name, inp, w=w):
            q = lp[group][name]
            y = inp @ q["kernel"] + q.get("bias", 0.0)
            if w is not None and name in moa.targets:
                for e in range(q["lora_a"].shape[0]):
                    y = y + moa.scale * w[..., e:e + 1] * (inp @ q["lora_a"][e] @ q["lora_b"][e])
            return y

        q = _rope(proj("attn", "q_proj", x).reshape(b, t, h_, dh), positions, cfg.rope_theta)
        k = _rope(proj("attn", "k_proj", x).reshape(b, t, k_, dh), positions, cfg.rope_theta)
        v = proj("attn", "v_proj", x).reshape(b, t, k_, dh)
        k, v = np.repeat(k, h_ // k_, axis=2), np.repeat(v, h_ // k_, axis=2)      # query head i uses kv i // G
        scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(dh)
        probs = _softmax(np.where(allowed, scores, -1e30))
        attn = np.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, h_ * dh)
        h = h + proj("attn", "o_proj", attn)
        x = _rms(h, lp["post_attn_norm"]["scale"], cfg.rms_norm_eps)
        gate, up = proj("mlp", "gate_proj", x), proj("mlp", "up_proj", x)
        h = h + proj("mlp", "down_proj", gate / (1.0 + np.exp(-gate)) * up)
    h = _rms(h, p["final_norm"]["scale"], cfg.rms_norm_eps)
    head = p["embed"]["embedding"].T if cfg.tie_word_embeddings else p["lm_head"]["kernel"]
    rl = np.stack(router_logits) if router_logits else None
    return h @ head, rl, float(np.mean(balances)) if balances else 0.0, margin


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def _layer(tree, i):
    if isinstance(tree, dict):
        return {k: _layer(v, i) for k, v in tree.items()}
    return tree[i]
