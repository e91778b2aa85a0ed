"""Stacked LoRA experts: the low-rank delta for each dispatch mode, as pure functions, plus the thin Flax module
(`AdaptedDense`) that adds the delta to a frozen projection.

Experts are stored as one array per projection, expert axis first:
  lora_a [E, Din, R]   (random init)      lora_b [E, R, Dout]   (zero init, so a fresh model equals its base)
and the delta of one token x under expert e is  scale * (x @ lora_a[e]) @ lora_b[e].

Dispatch modes (all take the same stacked arrays):
  single   E == 1, or one expert shared by the batch: tokens flattened to 2-D, two GEMMs (a plain LoRA at its best);
           `AdaptedDense` merges it into the frozen GEMM where cheaper, and a forward-only top-1 route takes this
           path at run time when every sequence of the batch has the same expert (`may_share_expert`).
  top1     one expert per sequence: gather A[idx] -> [B, Din, R], batched matmuls; cost of ONE LoRA, flat in E.
  mixture  gates per sequence [B, E] or per token [B, T, E] (soft MoA, token-level top-k MoE-LoRA):
           rank-concat form, A as [Din, E*R], gates scale the rank dim, B as [E*R, Dout]; cost grows with E.
  loop     plain loop over experts: the reference the tests compare every mode against.

Shape glossary: B batch, T tokens, Din/Dout projection widths, E experts, R rank.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from moa_jax.nn.quantize import SCALE_LEAF, dequantize, int8_kernel_init, int8_matmul, int8_scale_init

Array = jax.Array


class Route(NamedTuple):
    """How one layer's adapters pick experts, built by its constructors. Which fields are set is the (static)
    dispatch; the arrays are data (never shapes):
      Route.off()              no adapter: the base projection only
      Route.single()           expert 0 for every token
      Route.top1(expert_idx)   expert_idx [B]: sequence b through expert expert_idx[b]
      Route.mixture(gates)     gates [B, E] or [B, T, E]: the gated sum of every expert's delta
    """
    adapted: bool = True
    expert_idx: Optional[Array] = None
    gates: Optional[Array] = None

    @classmethod
    def off(cls) -> "Route":
        return cls(adapted=False)

    @classmethod
    def single(cls) -> "Route":
        return cls()

    @classmethod
    def top1(cls, expert_idx: Array) -> "Route":
        return cls(expert_idx=expert_idx)

    @classmethod
    def mixture(cls, gates: Array) -> "Route":
        return cls(gates=gates)

    def one_expert(self, num_experts: int) -> bool:
        """Every token through the same expert, known statically: Route.single(), or top-1 over one expert."""
        return self.adapted and self.gates is None and (self.expert_idx is None or num_experts == 1)


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
    """Sum x over the axes where `shape` broadcast (size 1), keeping them: the transpose of a broadcast."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@jax.custom_vjp
def low_rank(x: Array, a: Array, b: Array, gate: Array) -> Array:
    """((x @ a) * gate) @ b per group g: x [G, N, Din], a [G, Din, K], b [G, K, Dout], gate broadcastable to
    [G, N, K] (the LoRA scale, times the routing gates for mixtures) -> [G, N, Dout].

    The custom backward computes exactly autodiff's four products, but builds dA as (dh^T @ x)^T: XLA's CPU dot
    for an output [Din, K] with K tiny is several times slower than for [K, Din] (the optimisation barrier keeps
    the algebraic simplifier from folding the transpose back into the dot). Reverse mode only (no jvp).
    """
    h = jnp.einsum("gnd,gdk->gnk", x, a)
    return jnp.einsum("gnk,gko->gno", h * gate, b)


def _low_rank_fwd(x, a, b, gate):
    h = checkpoint_name(jnp.einsum("gnd,gdk->gnk", x, a), "lora_h")             # (G, N, K)
    return jnp.einsum("gnk,gko->gno", h * gate, b), (x, a, b, gate, h)


def _low_rank_bwd(res, dy):
    x, a, b, gate, h = res
    dhg = jnp.einsum("gno,gko->gnk", dy, b)                                      # d(h * gate)  (G, N, K)
    db = jnp.einsum("gnk,gno->gko", h * gate, dy)                                # (G, K, Dout)
    dh = dhg * gate
    dx = jnp.einsum("gnk,gdk->gnd", dh, a)                                       # (G, N, Din)
    da_t = jax.lax.optimization_barrier(jnp.einsum("gnk,gnd->gkd", dh, x))      # (G, K, Din)
    return dx, jnp.swapaxes(da_t, 1, 2), db, _sum_to_shape(dhg * h, gate.shape).astype(gate.dtype)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def merged_lora_matmul(x: Array, kernel: Array, a: Array, b: Array, scale: float) -> Array:
    """x [N, Din] @ (kernel + scale * a @ b) -> [N, Dout]: a frozen projection plus ONE expert as one GEMM.

    a [Din, R], b [R, Dout]. Forward: the merged weight (Din*Dout work, small next to N*Din*Dout) and one GEMM,
    instead of two skinny GEMMs and a full-size add. Backward: dx = dy @ merged^T (one GEMM, no separate LoRA
    term and add), dA = scale * x^T (dy b^T) and dB = scale * (x a)^T dy as in `low_rank`; the kernel's gradient
    x^T dy is returned too and removed by XLA whenever the kernel is not differentiated (frozen). f32 only: in
    bf16 the merged weight would round the small LoRA term away (see `merge_is_cheaper`).
    """
    return x @ (kernel + (a * scale) @ b)


def _merged_fwd(x, kernel, a, b, scale):
    return merged_lora_matmul(x, kernel, a, b, scale), (x, kernel, a, b)


def _merged_bwd(scale, res, dy):
    x, kernel, a, b = res
    dx = dy @ (kernel + (a * scale) @ b).T                                      # (N, Din)
    dh = (dy @ b.T) * scale                                                      # (N, R)
    da = jax.lax.optimization_barrier(dh.T @ x).T                               # (Din, R), built as (R, Din)
    db = ((x @ a) * scale).T @ dy                                               # (R, Dout)
    return dx, x.T @ dy, da, db


merged_lora_matmul.defvjp(_merged_fwd, _merged_bwd)


def merge_is_cheaper(num_tokens: int, d_in: int, d_out: int, dtype) -> bool:
    """Static rule for `merged_lora_matmul`: float32 compute, and enough tokens that the Din*Dout merge (done
    forward and again backward) costs less than the N*(Din+Dout)-sized passes it saves (training, prefill; not
    single-token decoding)."""
    return jnp.dtype(dtype) == jnp.float32 and num_tokens >= 2 * d_in * d_out / (d_in + d_out)


def may_share_expert(route: Route, num_experts: int, deterministic: bool) -> bool:
    """Static rule: a forward-only (deterministic) top-1 route over several experts checks at run time whether the
    whole batch runs one expert (a forced expert, a single-domain batch) and then takes the single-expert path
    (`lax.cond`); mixed batches keep the gather path. Training steps (deterministic=False) never branch."""
    return route.adapted and route.gates is None and route.expert_idx is not None and num_experts > 1 \
        and deterministic


def _scale(scale: float, x: Array) -> Array:
    return jnp.full((1, 1, 1), scale, x.dtype)


def lora_single(x: Array, lora_a: Array, lora_b: Array, scale: float, expert: int = 0) -> Array:
    """x [B, T, Din] -> [B, T, Dout] with one expert for all tokens, as two 2-D GEMMs over the B*T tokens."""
    lead = x.shape[:-1]
    x2 = x.reshape(1, -1, x.shape[-1])                                           # (1, B*T, Din)
    a = lora_a[expert][None].astype(x.dtype)                                     # (1, Din, R)
    b = lora_b[expert][None].astype(x.dtype)                                     # (1, R, Dout)
    return low_rank(x2, a, b, _scale(scale, x)).reshape(*lead, -1)              # 'nd,dr,ro->no'


def lora_top1(x: Array, lora_a: Array, lora_b: Array, expert_idx: Array, scale: float) -> Array:
    """x [B, T, Din], expert_idx [B] int -> [B, T, Dout]; sequence b uses expert expert_idx[b]."""
    a = jnp.take(lora_a, expert_idx, axis=0).astype(x.dtype)   # (B, Din, R)
    b = jnp.take(lora_b, expert_idx, axis=0).astype(x.dtype)   # (B, R, Dout)
    return low_rank(x, a, b, _scale(scale, x))                  # 'btd,bdr,bro->bto'


def lora_mixture(x: Array, lora_a: Array, lora_b: Array, gates: Array, scale: float) -> Array:
    """x [B, T, Din], gates [B, E] or [B, T, E] -> sum_e gates[..., e] * delta_e(x), in rank-concat form."""
    num_experts, d_in, rank = lora_a.shape
    bsz, t, _ = x.shape
    a_cat = jnp.transpose(lora_a, (1, 0, 2)).reshape(1, d_in, num_experts * rank).astype(x.dtype)  # (1, Din, E*R)
    b_cat = lora_b.reshape(1, num_experts * rank, -1).astype(x.dtype)                              # (1, E*R, Dout)
    g = jnp.repeat(gates.astype(x.dtype) * scale, rank, axis=-1)       # (B, [T,] E*R)
    if gates.ndim == 2:
        g = g[:, None, :]
    g = jnp.broadcast_to(g, (bsz, t, num_experts * rank)).reshape(1, bsz * t, -1)                  # (1, B*T, E*R)
    return low_rank(x.reshape(1, bsz * t, d_in), a_cat, b_cat, g).reshape(bsz, t, -1)


def lora_loop_reference(x: Array, lora_a: Array, lora_b: Array, weights: Array, scale: float) -> Array:
    """Reference: weights [B, T, E] (one-hot for top-1); explicit loop over experts. Tests only."""
    out = 0.0
    for e in range(lora_a.shape[0]):
        delta = (x @ lora_a[e]) @ lora_b[e]
        out = out + weights[..., e:e + 1] * delta
    return scale * out


def lora_delta(x: Array, lora_a: Array, lora_b: Array, route: Route, scale: float) -> Array:
    """Dispatch on the (static) structure of the route."""
    if not route.adapted:
        raise ValueError("Route.off() has no LoRA delta")
    if route.one_expert(lora_a.shape[0]):
        return lora_single(x, lora_a, lora_b, scale)
    if route.gates is None:
        return lora_top1(x, lora_a, lora_b, route.expert_idx, scale)
    return lora_mixture(x, lora_a, lora_b, route.gates, scale)


def lora_a_init(key, shape, dtype=jnp.float32):
    """Kaiming-uniform over Din per expert, as PEFT initialises lora_A (bound 1/sqrt(Din))."""
    bound = 1.0 / jnp.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _fmix32(h: Array) -> Array:
    """MurmurHash3's 32-bit finaliser: a bijective avalanche mix (every input bit flips each output bit w.p. ~1/2)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_bits(rng: jax.Array, shape: tuple) -> Array:
    """uint16 random numbers of `shape` from a counter-based hash keyed by 64 threefry bits of `rng`: two per
    32-bit word, two finaliser rounds per word (threefry-2x32 spends 20 rounds on two words)."""
    seed = jax.random.bits(rng, (2,), jnp.uint32)
    n = int(np.prod(shape))
    words = jax.lax.iota(jnp.uint32, -(-n // 2))
    h = _fmix32(_fmix32(words ^ seed[0]) + seed[1])
    return jax.lax.bitcast_convert_type(h, jnp.uint16).reshape(-1)[:n].reshape(shape)


def lora_dropout(x: Array, rate: float, rng: jax.Array) -> Array:
    """Inverted dropout on a LoRA input x [..., Din]: each element is kept with probability 1 - rate' and scaled by
    1 / (1 - rate'), rate' = round(65536 * rate) / 65536 (within 8e-6 of rate).

    Why not nn.Dropout: it draws 32 threefry bits per element, and the [B, T, Din] masks of every adapted
    projection then cost about a quarter of a cpu-tiny train step; the keyed hash costs a fraction of that. The
    masks are recomputed in the backward (cheaper than keeping them, measured)."""
    cut = round(rate * 65536)
    if cut == 0:
        return x
    keep = dropout_bits(rng, x.shape) >= jnp.uint16(cut)                             # P = 1 - cut / 65536
    return jnp.where(keep, x * jnp.asarray(65536 / (65536 - cut), x.dtype), jnp.zeros((), x.dtype))


class AdaptedDense(nn.Module):
    """A frozen projection x @ kernel (+ bias) plus, when `num_experts` > 0, the stacked-expert LoRA delta.

    Params: kernel [Din, Dout] (frozen base; with quantize="int8" an int8 kernel plus kernel_scale [Dout] f32,
    see moa_jax/nn/quantize.py), bias [Dout] (optional), lora_a [E, Din, R], lora_b [E, R, Dout].
    """
    features: int
    use_bias: bool = False
    num_experts: int = 0
    rank: int = 0
    scale: float = 1.0
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    adapter_dtype: jnp.dtype = jnp.float32
    quantize: str = "none"

    @nn.compact
    def __call__(self, x: Array, route: Route, deterministic: bool = True) -> Array:
        d_in = x.shape[-1]
        if self.quantize == "int8":
            q = self.param("kernel", int8_kernel_init, (d_in, self.features), jnp.int8)
            q_scale = self.param(SCALE_LEAF, int8_scale_init(d_in), (self.features,), jnp.float32)
            base_matmul = functools.partial(int8_matmul, q=q, scale=q_scale)
            dense_kernel = functools.partial(dequantize, q, q_scale, self.dtype)   # merge path only (one layer)
        else:
            kernel = self.param("kernel", nn.initializers.lecun_normal(), (d_in, self.features),
                                self.param_dtype).astype(self.dtype)
            base_matmul = lambda v: v @ kernel                                                # 'btd,do->bto'
            dense_kernel = lambda: kernel
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
                if self.use_bias else None)
        if self.num_experts > 0:
            lora_a = self.param("lora_a", lora_a_init, (self.num_experts, d_in, self.rank), self.adapter_dtype)
            lora_b = self.param("lora_b", nn.initializers.zeros, (self.num_experts, self.rank, self.features),
                                self.adapter_dtype)
        adapted = self.num_experts > 0 and route.adapted
        dropout = adapted and self.dropout > 0 and not deterministic
        merge = merge_is_cheaper(x.size // d_in, d_in, self.features, self.dtype)

        def one_expert(e):
            """Every token through expert e (static or traced): the merged GEMM where it is cheaper."""
            if merge:
                return merged_lora_matmul(x.reshape(-1, d_in), dense_kernel(), lora_a[e].astype(self.dtype),
                                          lora_b[e].astype(self.dtype), self.scale).reshape(*x.shape[:-1], -1)
            return base_matmul(x) + lora_single(x, lora_a, lora_b, self.scale, e).astype(self.dtype)

        def routed():
            y = base_matmul(x)
            if adapted:
                x_in = lora_dropout(x, self.dropout, self.make_rng("dropout")) if dropout else x
                y = y + lora_delta(x_in, lora_a, lora_b, route, self.scale).astype(y.dtype)
            return y

        if adapted and route.one_expert(self.num_experts) and not dropout and merge:
            y = one_expert(0)
        elif adapted and may_share_expert(route, self.num_experts, deterministic):
            idx, dt = route.expert_idx, jax.eval_shape(base_matmul, x).dtype
            y = jax.lax.cond(jnp.all(idx == idx[0]), lambda: one_expert(idx[0]).astype(dt), routed)
        else:
            y = routed()
        y = y if bias is None else y + bias
        return checkpoint_name(y, "proj")           # a residual the backward keeps (model.saved_residuals)
