"""The next-token choice of decoding: greedy, or a draw at a temperature, optionally from the top-k and/or nucleus
(top-p) filtered distribution.

    check_sampling(temperature, top_k, top_p)          # a SamplingError (a UserError) for a value that cannot work
    nxt = pick(logits, key, temperature, top_p, greedy=False, top_k=50, nucleus=True)

temperature <= 0 is greedy (argmax, the default); top_k = 0 and top_p = 1.0 are off. The filters apply after
temperature, top-k first: the k best tokens (top_k >= V keeps all), then from those the nucleus, the smallest set
of best tokens whose probability (renormalised over the top-k set) reaches top_p (always at least the best one);
the draw is from the kept tokens, renormalised. The filters need temperature > 0 (greedy's argmax is in every
top-k set and nucleus, so with temperature 0 they would silently do nothing: refused instead). Jit-friendly: k is
static (part of the compiled program's key), top_p a traced scalar, and the nucleus a mask over the sorted K
candidates, so no shape depends on the data.

Shape glossary: B batch, V vocab, K candidates kept by top-k (top_k, or V without it).
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from moa_jax.errors import UserError

Array = jax.Array


class SamplingError(UserError, ValueError):
    """temperature / top_k / top_p values that cannot work (or together do nothing)."""


def check_sampling(temperature: float, top_k: int, top_p: float, *, flags: bool = False) -> None:
    """Refuse a negative or non-integer top_k, a top_p outside (0, 1], and filters without temperature > 0.
    flags=True names the values as the generate command line's flags (--top-k 5) instead of arguments (top_k=5)."""
    def named(field: str, value) -> str:
        return f"--{field.replace('_', '-')} {value}" if flags else f"{field}={value!r}"
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise SamplingError(f"{named('top_k', top_k)}: give a whole number >= 0 (0 = off: every token is a "
                            f"candidate)")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise SamplingError(f"{named('top_p', top_p)}: give a probability in (0, 1] (1.0 = off: the whole "
                            f"distribution)")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or math.isnan(temperature):
        raise SamplingError(f"{named('temperature', temperature)}: give a number (0 = greedy)")
    if temperature <= 0 and (top_k > 0 or top_p < 1.0):
        used = [named(f, v) for f, v, on in (("top_k", top_k, top_k > 0), ("top_p", top_p, top_p < 1.0)) if on]
        raise SamplingError(f"{' and '.join(used)} {'filter' if len(used) > 1 else 'filters'} sampling, but "
                            f"{named('temperature', temperature)} decodes greedily: give "
                            f"{'--temperature' if flags else 'temperature'} > 0 (e.g. 0.7) to sample")


def pick(logits: Array, key: Array, temperature: Array, top_p: Array, *, greedy: bool, top_k: int = 0,
         nucleus: bool = False) -> Array:
    """Logits [B, V] -> the next token per row [B] int32. greedy / top_k / nucleus are static; temperature and
    top_p traced scalars (top_p is read only with nucleus=True)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not top_k and not nucleus:
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    k = min(top_k, scaled.shape[-1]) if top_k else scaled.shape[-1]
    vals, ids = jax.lax.top_k(scaled, k)                                    # (B, K) best first
    if nucleus:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs    # the mass of the better candidates; exactly 0 for the best
        vals = jnp.where(before < top_p, vals, -jnp.inf)
    choice = jax.random.categorical(key, vals, axis=-1)                     # (B,) an index into the K candidates
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
