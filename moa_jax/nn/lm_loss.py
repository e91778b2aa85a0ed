"""The LM head and the per-token negative log-likelihood without [B, T, V] logits.

Training and evaluation need only nll = logsumexp(logits) - logits[target] at the target positions. With a 128k-
152k vocabulary the full f32 logits of an 8 x 2048 batch are 8-10 GB (and their softmax as much again in the
backward), so `chunked_token_nll` computes the head block by block: a `lax.map` over blocks of `chunk` tokens,
each block rematerialised (`jax.checkpoint`), so the forward keeps only the [N] NLLs and the backward recomputes one
block's [chunk, V] logits at a time. At most one block (chunk x V floats, plus its gradient) is alive at once.
When all tokens fit one block the plain computation runs (no recomputation: small models and CPU keep their speed).

Shape glossary: B batch, K target positions per row, N = B * K tokens, C chunk, D width, V vocab.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def token_nll(logits, targets):
    """logits [..., V] predicting targets [...] -> nll [...].

    nll = logsumexp(logits) - logits[target], the target logit picked by a compare-and-sum that XLA fuses into one
    pass over the logits (its gradient is elementwise too): no log-softmax array, gather or scatter-into-zeros.
    """
    vocab = logits.shape[-1]
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.sum(jnp.where(jnp.arange(vocab) == targets[..., None], logits, 0.0), axis=-1)
    return lse - picked


def vocab_logits(h, weight, *, tied: bool, dtype):
    """h [..., D] (final-normed) -> f32 logits [..., V]. weight: the embedding table [V, D] when the head is tied,
    else lm_head/kernel [D, V]; both cast to the compute dtype first, as flax's Embed.attend / Dense do."""
    h, weight = h.astype(dtype), weight.astype(dtype)
    logits = jnp.einsum("...d,vd->...v" if tied else "...d,dv->...v", h, weight)
    return logits.astype(jnp.float32)


def chunked_token_nll(h, weight, targets, *, tied: bool, dtype, chunk: int):
    """h [B, K, D] final-normed hidden states predicting targets [B, K] -> nll [B, K] f32, `chunk` tokens at a
    time (module docstring). Same values and gradients as token_nll(vocab_logits(h, ...), targets)."""
    b, k, d = h.shape
    n = b * k
    hf, tf = h.reshape(n, d), targets.reshape(n)
    if n <= chunk:
        return token_nll(vocab_logits(hf, weight, tied=tied, dtype=dtype), tf).reshape(b, k)
    blocks = -(-n // chunk)
    pad = blocks * chunk - n
    hf = jnp.pad(hf, ((0, pad), (0, 0))).reshape(blocks, chunk, d)                       # (N/C, C, D)
    tf = jnp.pad(tf, (0, pad)).reshape(blocks, chunk)                                      # (N/C, C)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan: CSE cannot undo the remat
    def block(xs):  # keeps only its inputs for the backward: the [C, V] logits are recomputed there
        hb, tb = xs
        return token_nll(vocab_logits(hb, weight, tied=tied, dtype=dtype), tb)            # (C,)

    return jax.lax.map(block, (hf, tf)).reshape(blocks * chunk)[:n].reshape(b, k)
