"""Routed, batched decoding with a KV cache.

MoA inference routes once per sequence, from the prompt, and keeps that expert for every generated token:
  1. routing pass over the (left-padded) prompt: every layer routes with its own router ('self' mode; with
     MoAConfig.route_on='probe' one forward of the plain base model, its routers read the base hidden states:
     'probe' mode) and the decision policy (last router, or a vote) picks one expert per sequence;
  2. prefill the cache with that expert forced at every layer ('fixed' mode), then decode token by token with it.
So generating with the router equals generating with the chosen expert forced (a test checks exactly that). The
MoAConfig's routing policy may stop the routing pass early (after layer k) and let a prompt abstain when its
calibrated confidence is low: it then runs the fall-back, a named expert or the base model (adapters off).
Other routing (moa_jax.routing.ROUTINGS): 'oracle' (domain label given), 'forced' (one expert for all), 'base'
(adapters off), and for the token-level MoE-LoRA baseline each token routes itself ('token' mode) during prefill
and decoding alike; moa_jax.routing.resolve gives the plan of each.

Prompts are LEFT-padded so every sequence's next token sits in the last column; positions count real tokens
only, so padding changes nothing. Decoding runs as one jitted `lax.while_loop` that stops when every row has
emitted EOS or after max_new_tokens. The next token is greedy by default, or a draw at a temperature with optional
top-k / nucleus filters (sampling.py). Streaming is the same program with `on_token`: an ordered host callback
hands each step's new tokens to the host as they are decoded, and its answer can end the loop early (stream.py
turns that into a generator of text pieces).

Shape glossary: B batch, P prompt tokens (padded), N new tokens, S = P + N cache slots, L layers, E experts.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from moa_jax.config import ROUTING_DECISION_FIELDS, ModelConfig, MoAConfig
from moa_jax.generate.sampling import check_sampling, pick
from moa_jax.nn.entry import ModelInputs, forward, routing_pass
from moa_jax.nn.model import MoATransformer, init_cache
from moa_jax.nn.router import decide, decide_or_abstain
from moa_jax.routing import RoutePlan, RoutingPolicy, resolve, routing_policy

Array = jax.Array


def forward_moa(moa: Optional[MoAConfig]) -> Optional[MoAConfig]:
    """`moa` without its routing decision (policy, routing source, early exit, calibration, abstention), which only
    the routing pass uses: the key of every other compiled forward (so 'last' and 'vote', 'adapted' and 'probe'
    share them) and of results that depend on the adapters alone."""
    if moa is None:
        return None
    return dataclasses.replace(moa, **{f.name: f.default for f in dataclasses.fields(MoAConfig)
                                       if f.name in ROUTING_DECISION_FIELDS})


def sequence_experts(plan: RoutePlan, cfg: ModelConfig, moa: Optional[MoAConfig], params, tokens, attention_mask,
                     prompt_mask=None, *, expert: Optional[int] = None, domain=None, names=()):
    """-> (expert per sequence [B] int32, -1 where the adapters are off (the base model, an abstained prompt's
    fall-back included) or routing happens inside every forward; router logits [k, B, E] when a routing pass
    decided, else None): the given experts, or the routing pass. names: the expert names (a named fall-back)."""
    b = tokens.shape[0]
    if not plan.needs_experts:
        return jnp.full((b,), -1, jnp.int32), None
    given = plan.given_experts(b, moa.num_experts, expert=expert, labels=domain)
    if given is not None:
        return jnp.asarray(given), None
    return route_from_prompt(cfg, moa, params, tokens, attention_mask, prompt_mask, names=names)


@functools.lru_cache(maxsize=None)
def _route_fn(cfg: ModelConfig, moa: MoAConfig, policy: RoutingPolicy):
    model = MoATransformer(cfg, moa)
    mode = resolve(moa).pass_mode

    @jax.jit
    def route(params, tokens, attention_mask, prompt_mask):
        logits = routing_pass(model, params, ModelInputs(tokens, attention_mask, prompt_mask), mode=mode,
                              exit_layer=policy.exit_layer)                                     # (k, B, E)
        if not policy.abstains:
            return decide(logits, policy.decision), logits
        idx, _ = decide_or_abstain(logits, policy.decision, policy.temperature, policy.abstain_below, policy.fallback)
        return idx, logits
    return route


def route_from_prompt(cfg: ModelConfig, moa: MoAConfig, params, tokens, attention_mask, prompt_mask=None, *,
                      names=()):
    """-> (expert per sequence [B] int32, -1 for a prompt that abstained to the base model; router logits
    [k, B, E] of the routers that decided) from the routing pass, under the MoAConfig's routing policy (early exit
    after layer k, calibration, abstention; moa_jax.routing.routing_policy). names: the expert names, which a
    named fall-back needs."""
    prompt_mask = attention_mask if prompt_mask is None else prompt_mask
    policy = routing_policy(moa, cfg.num_layers, names)
    return _route_fn(cfg, moa, policy)(params, tokens, attention_mask, prompt_mask)


# Streaming: the host function of each running stream, by the id its decode program is called with (the compiled
# program is shared, so the function cannot be baked into it).
_LISTENERS: dict[int, Callable[[int, np.ndarray], bool]] = {}
_LISTENER_IDS = itertools.count()


def _to_listener(listener, step, tokens) -> np.ndarray:
    """Host side of the stream callback: hand (step, tokens [B]) on; -> whether to stop decoding."""
    return np.bool_(bool(_LISTENERS[int(listener)](int(step), np.asarray(tokens))))


@functools.lru_cache(maxsize=None)
def decode_fn(cfg: ModelConfig, moa: Optional[MoAConfig], mode: str, max_new_tokens: int, greedy: bool,
              top_k: int = 0, nucleus: bool = False, stream: bool = False):
    """The jitted decode program for (cfg, moa, routing mode, length, greedy or sampled, the top-k size, whether
    the nucleus filter applies, streamed or not), compiled once per key. decode(params, tokens, attention_mask,
    expert_idx, eos_ids, temperature, rng, top_p=1.0, listener=-1) -> new tokens [B, N]; `listener` (stream=True)
    is the id in _LISTENERS of the host function that receives every step."""
    model = MoATransformer(cfg, moa)

    @jax.jit
    def decode(params, tokens, attention_mask, expert_idx, eos_ids, temperature, rng, top_p=1.0, listener=-1):
        b, p = tokens.shape
        cache = init_cache(cfg, b, p + max_new_tokens)
        logits, aux = forward(model, params, ModelInputs(tokens, attention_mask), mode=mode, expert_idx=expert_idx,
                              cache=cache)                                                  # prefill
        choose = functools.partial(pick, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k,
                                   nucleus=nucleus)

        def finished(i, nxt, done):
            done = done | jnp.isin(nxt, eos_ids)
            if stream:   # the host sees every step in order; its True ends decoding after this step
                done = done | io_callback(_to_listener, jax.ShapeDtypeStruct((), jnp.bool_), listener, i, nxt,
                                          ordered=True)
            return done

        rng, key = jax.random.split(rng)
        first = choose(logits[:, -1], key)                                                 # (B,)
        out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
        done = finished(jnp.zeros((), jnp.int32), first, jnp.zeros((b,), bool))

        def cond(carry):
            i, _, _, done, _ = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            i, out, cache, done, rng = carry
            prev = out[:, i - 1][:, None]                                               # (B, 1)
            step_logits, step_aux = forward(model, params, ModelInputs(prev, jnp.ones_like(prev)), mode=mode,
                                            expert_idx=expert_idx, cache=cache)
            rng, key = jax.random.split(rng)
            nxt = choose(step_logits[:, -1], key)
            nxt = jnp.where(done, eos_ids[0], nxt)   # finished rows keep emitting EOS (trimmed by the caller)
            out = out.at[:, i].set(nxt)
            return i + 1, out, step_aux["cache"], finished(i, nxt, done), rng

        _, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), out, aux["cache"], done, rng))
        return out
    return decode


def generate_tokens(cfg: ModelConfig, moa: Optional[MoAConfig], params, tokens, attention_mask, *,
                    routing: str = "router", expert: Optional[int] = None, domain=None, prompt_mask=None,
                    max_new_tokens: int = 32, eos_ids=(2,), temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 0, names: Sequence[str] = (),
                    on_token: Optional[Callable[[int, np.ndarray, np.ndarray], bool]] = None):
    """Left-padded prompts [B, P] -> (new tokens [B, N] with everything after the first EOS set to EOS,
    expert per sequence [B] (-1 for base, an abstained prompt's base fall-back included: it generates with the
    adapters off), router logits [k, B, E] or None; names: the expert names, for a named fall-back).
    temperature / top_k / top_p as in
    moa_jax/generate/sampling.py (a SamplingError for values that cannot work). on_token(step, tokens [B],
    experts [B]) is called on the host with each step's new tokens as they are decoded (from the thread running
    the program); returning True ends decoding after that step (the columns not reached stay 0)."""
    check_sampling(temperature, top_k, top_p)
    tokens = jnp.asarray(tokens, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    plan = resolve(moa, routing)
    if not plan.cacheable:
        # The per-sequence gates come from pooling the prompt; a cached decode step sees only its new token and
        # would re-pool over it alone. Soft MoA is evaluated by perplexity (full forward) instead.
        raise ValueError("generation with dispatch='soft' is not supported (cached decoding would re-pool the "
                         "routers over each new token); evaluate soft mixtures by perplexity, or use top1")
    idx, router_logits = sequence_experts(plan, cfg, moa, params, tokens, attention_mask, prompt_mask,
                                          expert=expert, domain=domain, names=names)
    greedy = temperature <= 0.0
    args = (params, tokens, attention_mask, jnp.maximum(idx, 0), jnp.asarray(eos_ids, jnp.int32),
            jnp.float32(max(temperature, 1e-6)), jax.random.PRNGKey(seed), jnp.float32(top_p))

    def run(mode: str):
        decode = decode_fn(cfg, forward_moa(moa), mode, int(max_new_tokens), greedy,
                           0 if greedy else int(top_k), not greedy and top_p < 1.0, on_token is not None)
        if on_token is None:
            return decode(*args)
        listener, experts = next(_LISTENER_IDS), np.asarray(idx)
        _LISTENERS[listener] = lambda step, new: on_token(step, new, experts)
        try:
            return jax.block_until_ready(decode(*args, jnp.int32(listener)))
        finally:
            del _LISTENERS[listener]

    # Prompts that abstained to the base model (-1 from a routing pass) generate with the adapters off.
    to_base = np.asarray(idx) < 0 if plan.needs_routing_pass else np.zeros(tokens.shape[0], bool)
    if to_base.all():
        out = run("base")
    elif to_base.any():
        if on_token is not None:
            raise ValueError("streaming a batch whose prompts go partly to the base model (abstained) and partly to "
                             "experts is not supported: stream one prompt at a time")
        out = np.where(to_base[:, None], np.asarray(run("base")), np.asarray(run(plan.mode)))
    else:
        out = run(plan.mode)
    return np.asarray(out), np.asarray(idx), router_logits


def left_pad(sequences: list[list[int]], pad_id: int, multiple: int = 16,
             length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [B, P], attention_mask [B, P]); P rounded up to `multiple` to bound recompiles, and
    at least `length` (give every batch of a run the same P: one compiled decode for all of them)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_pad: every prompt must have at least one token")
    p = -(-max(length, max(len(s) for s in sequences)) // multiple) * multiple
    tokens = np.full((len(sequences), p), pad_id, np.int32)
    mask = np.zeros((len(sequences), p), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, p - len(s):] = s
        mask[i, p - len(s):] = 1
    return tokens, mask


def eos_ids(tokenizer) -> tuple[int, ...]:
    """The token ids that end an answer: EOS, and the end-of-turn tokens chat models emit instead of it."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return tuple(sorted(i for i in ids if i is not None))


def until_eos(row, eos: Sequence[int]) -> list[int]:
    """A generated row [T] -> its token ids up to (not including) the first of `eos` (finished rows repeat EOS)."""
    ids = [int(t) for t in row]
    stop = set(eos)
    return ids[:next((i for i, t in enumerate(ids) if t in stop), len(ids))]
