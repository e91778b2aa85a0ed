"""Per-layer routers: prompt-masked pooling, router logits (float32), the routing losses and the inference
decision policies, as pure functions; plus the thin `Router` module that owns the router weights.

MoA routes per SEQUENCE from the PROMPT: each layer's router reads the layer's (normalised) input hidden states,
mean-pooled over prompt tokens only (pad and response excluded, since the response does not exist at inference),
and outputs logits over the E experts. Training supervises every layer's logits with the domain label
(cross-entropy, averaged over layers). At inference the decision is the last layer's argmax (paper) or a vote, over
every router or, with an early exit, over the first k; a calibrated confidence below a threshold abstains (the
sequence goes to a fall-back: the base model or a named expert).
The token-level MoE-LoRA baseline instead routes each token (top-k) with a load-balancing loss.

Shape glossary: B batch, T tokens, G segments of a packed row, D model width, E experts, L layers, k top-k.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def masked_mean_pool(h: Array, mask: Array) -> Array:
    """h [B, T, D], mask [B, T] (1 = pooled) -> [B, D] float32. An all-zero row pools to zeros."""
    m = mask.astype(jnp.float32)[..., None]                        # (B, T, 1)
    total = jnp.sum(h.astype(jnp.float32) * m, axis=1)             # (B, D)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def segment_mean_pool(h: Array, mask: Array, segment_ids: Array, num_segments: int) -> Array:
    """Packed rows: h [B, T, D], mask [B, T] (1 = pooled), segment_ids [B, T] (1..G, 0 = pad) -> [B, G, D] f32,
    each segment's masked mean (an empty segment pools to zeros)."""
    member = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)) & (mask[..., None] > 0)   # (B, T, G)
    m = member.astype(jnp.float32)
    total = jnp.einsum("btg,btd->bgd", m, h.astype(jnp.float32))
    return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)[..., None]


def router_ce_loss(logits: Array, labels: Array, valid: Array | None = None) -> Array:
    """logits [L, B, E] f32, labels [B] int -> mean over layers and valid samples of CE(logits, label)."""
    w = jnp.ones(labels.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
    labels = jnp.where(w > 0, labels, 0)   # an invalid sample's label may be anything (padding): never gather it
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[None, :, None], axis=-1)[..., 0]   # (L, B)
    return jnp.sum(nll * w[None]) / (logits.shape[0] * jnp.maximum(jnp.sum(w), 1.0))


def router_accuracy(logits: Array, labels: Array, valid: Array | None = None) -> Array:
    """Fraction of (layer, sample) pairs whose argmax equals the label, over valid samples."""
    hit = (jnp.argmax(logits, axis=-1) == labels[None]).astype(jnp.float32)   # (L, B)
    w = jnp.ones(labels.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
    return jnp.sum(hit * w[None]) / (logits.shape[0] * jnp.maximum(jnp.sum(w), 1.0))


def decide(logits: Array, policy: str = "last") -> Array:
    """logits [L, B, E] -> expert per sequence [B] int32.

    last: argmax of the last layer's router (the paper: "more stable").
    vote: most frequent argmax over layers; ties go to the larger summed probability.
    """
    if policy == "last":
        return jnp.argmax(logits[-1], axis=-1).astype(jnp.int32)
    if policy == "vote":
        num_experts = logits.shape[-1]
        votes = jnp.sum(jax.nn.one_hot(jnp.argmax(logits, -1), num_experts), axis=0)   # (B, E)
        tie_break = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), -1), axis=0)   # (B, E), in [0, 1)
        return jnp.argmax(votes + 0.5 * tie_break, axis=-1).astype(jnp.int32)
    raise ValueError(f"unknown decision policy {policy!r}; valid: 'last', 'vote'")


def decision_probs(logits: Array, policy: str = "last", temperature: float = 1.0) -> Array:
    """logits [L, B, E] -> the probabilities [B, E] the decision reads, calibrated by `temperature`: last:
    softmax(logits[-1] / T); vote: the mean over layers of softmax(logits[l] / T). Their value at the decided expert
    is the confidence that abstention compares with its threshold."""
    z = logits.astype(jnp.float32) / temperature
    if policy == "last":
        return jax.nn.softmax(z[-1], axis=-1)
    return jnp.mean(jax.nn.softmax(z, axis=-1), axis=0)


def decide_or_abstain(logits: Array, policy: str = "last", temperature: float = 1.0, abstain_below: float = 0.0,
                      fallback: int = -1) -> tuple[Array, Array]:
    """logits [L, B, E] of the routers that decide (an early exit passes its first k) -> (expert per sequence [B]
    int32, confidence [B] f32). A sequence whose calibrated confidence (decision_probs at the decided expert) is
    below `abstain_below` gets `fallback` instead: -1 = the base model (adapters off) or an expert id."""
    chosen = decide(logits, policy)                                                       # (B,)
    probs = decision_probs(logits, policy, temperature)                                   # (B, E)
    confidence = jnp.take_along_axis(probs, chosen[:, None], axis=-1)[:, 0]
    return jnp.where(confidence < abstain_below, jnp.int32(fallback), chosen), confidence


def top_k_gates(logits: Array, k: int) -> tuple[Array, Array, Array]:
    """Token-level top-k. logits [B, T, E] -> (gates [B, T, E] renormalised over the top k, zeros elsewhere;
    probs [B, T, E]; chosen [B, T, k])."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p, chosen = jax.lax.top_k(probs, k)                                         # (B, T, k)
    top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    gates = jnp.sum(jax.nn.one_hot(chosen, logits.shape[-1]) * top_p[..., None], axis=-2)
    return gates, probs, chosen


def load_balancing_loss(probs: Array, chosen: Array, mask: Array) -> Array:
    """Switch-Transformer auxiliary loss E * sum_e f_e * P_e over valid tokens; 1.0 when perfectly balanced.

    probs [B, T, E], chosen [B, T, k], mask [B, T]: f_e = share of routed slots sent to e, P_e = mean probability.
    """
    num_experts = probs.shape[-1]
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    counts = jnp.sum(jax.nn.one_hot(chosen, num_experts) * m[..., None, None], axis=(0, 1, 2))   # (E,)
    frac = counts / (n * chosen.shape[-1])
    mean_p = jnp.sum(probs * m[..., None], axis=(0, 1)) / n
    return num_experts * jnp.sum(frac * mean_p)


class Router(nn.Module):
    """Bias-free linear D -> E (default), or a two-layer MLP D -> hidden -> E; output in float32.

    Params: kernel [D, E] (linear) | hidden.kernel [D, Hr], out.kernel [Hr, E] (mlp).
    """
    num_experts: int
    router_type: str = "linear"
    hidden: int = 256
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [..., D] (pooled [B, D] or per token [B, T, D]) -> logits [..., E] float32."""
        x = x.astype(jnp.float32)
        init = nn.initializers.normal(stddev=0.02)
        if self.router_type == "mlp":
            x = nn.gelu(nn.Dense(self.hidden, use_bias=False, kernel_init=init, param_dtype=self.param_dtype,
                                 dtype=jnp.float32, name="hidden")(x))
            return nn.Dense(self.num_experts, use_bias=False, kernel_init=init, param_dtype=self.param_dtype,
                            dtype=jnp.float32, name="out")(x)
        kernel = self.param("kernel", init, (x.shape[-1], self.num_experts), self.param_dtype)
        return x @ kernel.astype(jnp.float32)                    # '...d,de->...e'
