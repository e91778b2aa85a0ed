"""The MoA decoder: identity at init, every routing mode vs a numpy reference and vs 'fixed' runs, KV cache,
router pooling, gradients of the trainable part, split/merge, compute dtype, dropout, remat, bad routing.

All runs go through a few jitted functions with static configs, and share the batch shape [2, 8], so the whole
file compiles each (config, routing mode) once.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.errors import InvalidRngError

from moa_jax.config import MoAConfig
from moa_jax.nn.model import MoATransformer, init_cache
from moa_jax.routing import MODES as ROUTING_MODES
from moa_jax.params import (check_tree, count_params, init_trainable, merge_params, param_shapes,
                            split_params)
from moa_jax.nn.router import router_ce_loss
from tests import reference
from tests.conftest import make_tiny_cfg, make_tiny_moa

B, T = 2, 8
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (B, T)), jnp.int32)
ATTN = jnp.array([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]], jnp.int32)          # row 1 is left-padded
PROMPT = jnp.array([[1] * 5 + [0] * 3, [0, 0, 1, 1, 1, 0, 0, 0]], jnp.int32)  # prompt, then response
IDX = jnp.array([2, 1], jnp.int32)
VALID = np.asarray(ATTN, bool)                                             # compare logits at real tokens only
UNTIED, TIED_BIAS = make_tiny_cfg(), make_tiny_cfg(tie_word_embeddings=True, attention_bias=True)
MOA = make_tiny_moa()


@functools.partial(jax.jit, static_argnames=("cfg", "moa", "routing"))
def run(params, tokens, attention_mask, prompt_mask, expert_idx, *, cfg, moa, routing):
    logits, aux = MoATransformer(cfg, moa).apply({"params": params}, tokens, attention_mask=attention_mask,
                                                 prompt_mask=prompt_mask, routing=routing, expert_idx=expert_idx)
    return logits, aux["router_logits"], aux["balance_loss"]


def run_batch(params, cfg, moa, routing, tokens=TOKENS, attn=ATTN, prompt=PROMPT, idx=IDX):
    return run(params, tokens, attn, prompt, idx, cfg=cfg, moa=moa, routing=routing)


@functools.lru_cache(maxsize=None)
def cached_shapes(cfg, moa):
    """param_shapes traces the model (~0.3 s); trace each (config, MoA config) once per file."""
    return param_shapes(cfg, moa)


def random_params(cfg, moa, seed=0, lora_b_std=0.3, router_std=1.0):
    """A full tree of the model's shapes with random values everywhere (norm scales too), from numpy."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(cached_shapes(cfg, moa))
    out = {}
    for path, sd in flat.items():
        name, shape = path[-1], sd.shape
        if "router" in path:
            v = rng.normal(size=shape) * router_std
        elif name == "lora_b":
            v = rng.normal(size=shape) * lora_b_std
        elif name == "lora_a":
            v = rng.uniform(-1, 1, size=shape) / np.sqrt(shape[-2])
        elif name == "kernel":
            v = rng.normal(size=shape) / np.sqrt(shape[-2])
        elif name == "scale":
            v = 1.0 + 0.1 * rng.normal(size=shape)
        else:  # embedding, bias
            v = rng.normal(size=shape) * (1.0 if name == "embedding" else 0.1)
        out[path] = jnp.asarray(v, sd.dtype)
    return traverse_util.unflatten_dict(out)


@functools.lru_cache(maxsize=None)
def initial_params(seed):
    """Fresh experts and routers from `init_trainable` (the path used with real checkpoints, and half the
    compile time of `init_params`) on random base weights, which are arbitrary for these tests."""
    trainable = init_trainable(UNTIED, MOA, jax.random.PRNGKey(seed))
    expected_trainable = split_params(cached_shapes(UNTIED, MOA))[1]
    check_tree(expected_trainable, trainable, "init_trainable")
    return merge_params(split_params(random_params(UNTIED, MOA, seed))[0], trainable)


def leaves_named(params, name):
    return [v for k, v in traverse_util.flatten_dict(params).items() if k[-1] == name]


# ----------------------------------------------------------------------------------------------- identity at init

def test_fresh_model_equals_base_in_every_mode():
    """lora_b is zero at init, so every delta is exactly 0.0 (x @ A @ 0, also in the rank-concat mixture) and
    y + 0.0 == y; the base projections are the same ops in every mode's program: bit-equal, atol 0."""
    params = initial_params(0)
    assert all(np.all(np.asarray(b) == 0) for b in leaves_named(params, "lora_b"))
    assert all(np.abs(np.asarray(a)).max() > 0 for a in leaves_named(params, "lora_a"))
    base, _, _ = run_batch(params, UNTIED, MOA, "base")
    assert base.dtype == jnp.float32 and base.shape == (B, T, UNTIED.vocab_size)
    for mode in ROUTING_MODES[1:]:
        logits, router_logits, _ = run_batch(params, UNTIED, MOA, mode)
        np.testing.assert_array_equal(logits, base, err_msg=mode)
        assert router_logits.shape == (UNTIED.num_layers, B, MOA.num_experts)
        assert router_logits.dtype == jnp.float32 and np.abs(router_logits).max() > 0


def test_model_without_moa_equals_base_mode(tiny_cfg_variant, tiny_moa):
    cfg = tiny_cfg_variant                      # == UNTIED or TIED_BIAS: the jitted runs are shared
    assert cfg in (UNTIED, TIED_BIAS) and tiny_moa == MOA
    params = random_params(cfg, MOA)
    frozen, _ = split_params(params)
    check_tree(param_shapes(cfg, None), frozen, "frozen part vs the moa=None model")   # same tree, same shapes
    plain, router_logits, _ = run_batch(frozen, cfg, None, "fixed")
    base, _, _ = run_batch(params, cfg, MOA, "base")
    np.testing.assert_array_equal(plain, base)
    assert router_logits.shape == (cfg.num_layers, B, 1) and np.all(np.asarray(router_logits) == 0)


# ------------------------------------------------------------------------------------ every mode vs numpy reference

@pytest.mark.parametrize("cfg, mode", [(UNTIED, m) for m in ROUTING_MODES] + [(TIED_BIAS, "base"),
                                                                              (TIED_BIAS, "fixed")],
                         ids=[f"untied-{m}" for m in ROUTING_MODES] + ["tied_bias-base", "tied_bias-fixed"])
def test_routing_modes_match_numpy_reference(cfg, mode):
    """Random weights everywhere (non-zero lora_b, router std 1); the reference loops over layers and experts
    in float64 with the routing rules of model.py's docstring. Compared at real (non-pad) tokens."""
    params = random_params(cfg, MOA, seed=1)
    logits, router_logits, balance = run_batch(params, cfg, MOA, mode)
    ref_logits, ref_router, ref_balance, margin = reference.forward(cfg, MOA, params, TOKENS, mode, IDX, ATTN,
                                                                    PROMPT)
    # argmax / top-k decisions must be far from a tie for float32 vs float64 to agree (seed 1 gives >= 0.09)
    assert margin > 1e-2, f"routing decision within {margin} of a tie: pick another seed"
    # observed errors are ~1e-6 (logits up to ~20): the 1e-5 tolerance still catches e.g. a misplaced RMS eps
    np.testing.assert_allclose(np.asarray(logits)[VALID], ref_logits[VALID], rtol=1e-5, atol=1e-5)
    if mode == "base":
        return
    np.testing.assert_allclose(router_logits, ref_router, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(balance, ref_balance, rtol=1e-5)
    base, _, _ = run_batch(params, cfg, MOA, "base")
    if mode == "probe":   # the base model's output; its router logits were checked above
        np.testing.assert_array_equal(np.asarray(logits)[VALID], np.asarray(base)[VALID])
        return
    assert np.abs(np.asarray(logits - base)[VALID]).max() > 1e-2, "adapters should change the output"


def test_fixed_equals_each_sequence_alone_with_its_sliced_expert():
    """Reference: sequence b alone through an E=1 model whose only expert is expert IDX[b] of the stack."""
    params = random_params(UNTIED, MOA, seed=2)
    logits, _, _ = run_batch(params, UNTIED, MOA, "fixed")
    base, _, _ = run_batch(params, UNTIED, MOA, "base")
    moa1 = dataclasses.replace(MOA, num_experts=1)
    for b in range(B):
        e = int(IDX[b])
        flat = traverse_util.flatten_dict(params)
        sliced = {k: (v[:, e:e + 1] if k[-1] in ("lora_a", "lora_b") else v[..., e:e + 1] if "router" in k else v)
                  for k, v in flat.items()}
        sliced = traverse_util.unflatten_dict(sliced)
        check_tree(cached_shapes(UNTIED, moa1), sliced, "sliced E=1 tree")
        alone, _, _ = run(sliced, TOKENS[b:b + 1], ATTN[b:b + 1], PROMPT[b:b + 1], jnp.zeros((1,), jnp.int32),
                          cfg=UNTIED, moa=moa1, routing="fixed")
        v = VALID[b]
        np.testing.assert_allclose(np.asarray(logits[b])[v], np.asarray(alone[0])[v], rtol=1e-5, atol=1e-5)
        assert np.abs(np.asarray(logits[b] - base[b])[v]).max() > 1e-2


def _dominant_expert_params(seed, experts_for_sign):
    """Routers agree in every layer by construction: embedding column 0 is +50 for even token ids and -50 for
    odd ones (it dominates the residual stream through both layers), and each router's logits are
    1000 * x[0] for expert experts_for_sign[0], -1000 * x[0] for experts_for_sign[1], 0 for the rest. So an
    all-even sequence routes to experts_for_sign[0] with softmax gates that are exactly one-hot in float32."""
    params = random_params(UNTIED, MOA, seed=seed)
    emb = np.asarray(params["embed"]["embedding"]).copy()
    emb[:, 0] = np.where(np.arange(emb.shape[0]) % 2 == 0, 50.0, -50.0)
    router = np.zeros(params["layers"]["router"]["kernel"].shape, np.float32)     # (L, D, E)
    router[:, 0, experts_for_sign[0]], router[:, 0, experts_for_sign[1]] = 1000.0, -1000.0
    params = {**params, "embed": {"embedding": jnp.asarray(emb)}}
    params["layers"] = {**params["layers"], "router": {"kernel": jnp.asarray(router)}}
    return params


def test_self_soft_token_equal_fixed_when_routers_agree_by_construction():
    params = _dominant_expert_params(seed=3, experts_for_sign=(2, 0))
    tokens = jnp.stack([TOKENS[0] // 2 * 2, TOKENS[1] // 2 * 2 + 1])               # row 0 even, row 1 odd ids
    attn = jnp.ones((B, T), jnp.int32)
    expected_idx = jnp.array([2, 0], jnp.int32)
    fixed, _, _ = run_batch(params, UNTIED, MOA, "fixed", tokens, attn, PROMPT, expected_idx)
    wrong, _, _ = run_batch(params, UNTIED, MOA, "fixed", tokens, attn, PROMPT, jnp.array([1, 1], jnp.int32))
    assert np.abs(np.asarray(fixed - wrong)).max() > 1e-2
    for mode, tol in (("self", 1e-6), ("soft", 1e-5), ("token", 1e-5)):
        logits, router_logits, _ = run_batch(params, UNTIED, MOA, mode, tokens, attn, PROMPT, jnp.array([1, 1]))
        # the precondition: every layer's router picks the expected expert with gates exactly one-hot
        np.testing.assert_array_equal(np.argmax(router_logits, -1), np.broadcast_to(expected_idx, (2, B)))
        np.testing.assert_array_equal(jax.nn.softmax(router_logits, -1), jax.nn.one_hot(
            np.broadcast_to(expected_idx, (2, B)), MOA.num_experts))
        # self: the same top-1 path as fixed (only the source of idx differs); soft/token: the rank-concat
        # mixture path, which sums the same products in another order, hence 1e-5
        np.testing.assert_allclose(logits, fixed, rtol=tol, atol=tol, err_msg=mode)


# ----------------------------------------------------------------------------------------------------- KV cache

@functools.partial(jax.jit, static_argnames=("cfg", "moa"))
def run_cached(params, tokens, attention_mask, expert_idx, cache, *, cfg, moa):
    logits, aux = MoATransformer(cfg, moa).apply({"params": params}, tokens, attention_mask=attention_mask,
                                                 routing="fixed", expert_idx=expert_idx, cache=cache)
    return logits, aux["cache"]


def test_kv_cache_prefill_and_steps_match_full_forward_with_left_padding():
    """Row 0: prompt of 5, no padding. Row 1: prompt of 3, left-padded by 2 (pad ids arbitrary). Prefill,
    then 3 one-token steps; each row's logits must equal that sequence run alone, unpadded, without cache.

    The no-cache reference runs both sequences in one unpadded [2, 8] batch (rows are independent; row 1 is
    followed by 2 junk tokens, which causal attention keeps out of its first 6 positions): no extra compile."""
    params = random_params(UNTIED, MOA, seed=4)
    rng = np.random.default_rng(4)
    seq = [rng.integers(0, 64, 8), rng.integers(0, 64, 6)]
    prompt_len, steps, slots = (5, 3), 3, 8
    idx = jnp.array([1, 2], jnp.int32)
    full = jnp.asarray(np.stack([seq[0], np.concatenate([seq[1], [3, 5]])]), jnp.int32)
    ones = jnp.ones((B, T), jnp.int32)
    alone, _, _ = run_batch(params, UNTIED, MOA, "fixed", full, ones, ones, idx)
    alone = np.asarray(alone)

    prefill = np.array([seq[0][:5], np.concatenate([[7, 7], seq[1][:3]])], np.int32)
    mask = np.array([[1] * 5, [0, 0, 1, 1, 1]], np.int32)
    cache = init_cache(UNTIED, B, slots)
    logits, cache = run_cached(params, jnp.asarray(prefill), jnp.asarray(mask), idx, cache, cfg=UNTIED, moa=MOA)
    np.testing.assert_allclose(logits[0], alone[0][:5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[1, 2:], alone[1][:3], rtol=1e-5, atol=1e-5)
    for i in range(steps):
        step = jnp.asarray([[seq[0][prompt_len[0] + i]], [seq[1][prompt_len[1] + i]]], jnp.int32)
        logits, cache = run_cached(params, step, jnp.ones((B, 1), jnp.int32), idx, cache, cfg=UNTIED, moa=MOA)
        for b in range(B):
            np.testing.assert_allclose(logits[b, 0], alone[b][prompt_len[b] + i], rtol=1e-5, atol=1e-5,
                                       err_msg=f"row {b} step {i}")
    assert int(cache["index"]) == slots
    np.testing.assert_array_equal(cache["valid"], [[True] * 8, [False, False] + [True] * 6])
    assert cache["k"].shape == (UNTIED.num_layers, B, slots, UNTIED.num_kv_heads, UNTIED.head_dim)


# ------------------------------------------------------------------------------------------------ router pooling

def test_router_logits_ignore_response_and_pad_tokens():
    params = random_params(UNTIED, MOA, seed=5)
    _, router_logits, _ = run_batch(params, UNTIED, MOA, "self")
    not_prompt = np.asarray(PROMPT) == 0                      # response tokens and row 1's pads
    changed = jnp.where(jnp.asarray(not_prompt), (TOKENS + 17) % 64, TOKENS)
    assert np.any(np.asarray(changed) != np.asarray(TOKENS))
    _, router_changed, _ = run_batch(params, UNTIED, MOA, "self", tokens=changed)
    np.testing.assert_array_equal(router_changed, router_logits)

    one_prompt_token = TOKENS.at[1, 3].set((TOKENS[1, 3] + 1) % 64)   # a prompt token: routers must see it
    _, router_prompt, _ = run_batch(params, UNTIED, MOA, "self", tokens=one_prompt_token)
    assert np.abs(np.asarray(router_prompt - router_logits)[:, 1]).max() > 1e-4
    np.testing.assert_array_equal(router_prompt[:, 0], router_logits[:, 0])      # rows are independent


# -------------------------------------------------------------------------------------------- gradients, params

def _loss(trainable, frozen, cfg):
    logits, aux = MoATransformer(cfg, MOA).apply({"params": merge_params(frozen, trainable)}, TOKENS,
                                                 attention_mask=ATTN, prompt_mask=PROMPT, routing="fixed",
                                                 expert_idx=IDX)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, TOKENS[:, 1:, None], -1)[..., 0]
    w = ATTN[:, 1:]
    return jnp.sum(nll * w) / jnp.sum(w) + 0.1 * router_ce_loss(aux["router_logits"], IDX), logits


@functools.partial(jax.jit, static_argnames=("cfg",))
def loss_and_grads(trainable, frozen, cfg):
    return jax.value_and_grad(_loss, has_aux=True)(trainable, frozen, cfg)


def _grad_check_tree(trainable, grads):
    flat_t, flat_g = traverse_util.flatten_dict(trainable), traverse_util.flatten_dict(grads)
    assert set(flat_g) == set(flat_t)
    for k, g in flat_g.items():
        assert g.shape == flat_t[k].shape and g.dtype == flat_t[k].dtype and np.all(np.isfinite(g)), k


def test_trainable_split_and_gradients():
    frozen, trainable = split_params(initial_params(0))
    flat_t, flat_f = traverse_util.flatten_dict(trainable), traverse_util.flatten_dict(frozen)
    projections = {k[-2] for k in flat_t if k[-1] == "lora_a"}
    assert projections == set(MOA.targets) and len(flat_t) == 2 * len(MOA.targets) + 1
    assert all(k[-1] in ("lora_a", "lora_b") or k[-2:] == ("router", "kernel") for k in flat_t)
    assert not any(k[-1] in ("lora_a", "lora_b") or "router" in k for k in flat_f)

    # at init (lora_b == 0) the LM loss reaches lora_b and the router loss the router, but not lora_a
    (_, _), grads = loss_and_grads(trainable, frozen, UNTIED)
    _grad_check_tree(trainable, grads)
    assert all(np.all(np.asarray(g) == 0) for g in leaves_named(grads, "lora_a"))
    assert all(np.abs(np.asarray(g)).max() > 0 for g in leaves_named(grads, "lora_b"))
    assert np.abs(np.asarray(grads["layers"]["router"]["kernel"])).max() > 0

    # with non-zero lora_b, lora_a gets gradient too, but only the experts in IDX (2, 1), never expert 0
    frozen, trainable = split_params(random_params(UNTIED, MOA, seed=6, router_std=0.02))
    (_, _), grads = loss_and_grads(trainable, frozen, UNTIED)
    for g in leaves_named(grads, "lora_a") + leaves_named(grads, "lora_b"):
        g = np.asarray(g)                                                          # (L, E, ., .)
        assert np.all(g[:, 0] == 0) and np.abs(g[:, 1]).max() > 0 and np.abs(g[:, 2]).max() > 0


@pytest.mark.parametrize("remat", ["full", "none"])
def test_remat_policies_give_same_logits_and_grads(remat):
    frozen, trainable = split_params(random_params(UNTIED, MOA, seed=7))
    (loss, logits), grads = loss_and_grads(trainable, frozen, dataclasses.replace(UNTIED, remat="projections"))
    (loss_r, logits_r), grads_r = loss_and_grads(trainable, frozen, dataclasses.replace(UNTIED, remat=remat))
    # Remat recomputes the forward in another fusion, so each matmul/norm may round its float32 result by ~1 ulp
    # differently (how depends on the CPU's vector width: AVX-512 or not); over L=2 layers of ~8 such ops that is
    # ~16 ulps, x4 headroom for the reduction order inside D=32..F=64-term sums: 64 eps of each array's own scale.
    # A wrong policy (a missed or doubled term) differs by O(1) of the scale.
    tol = 64 * np.finfo(np.float32).eps

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.max(np.abs(b))))

    close(logits_r, logits)
    close(loss_r, loss)
    jax.tree.map(close, grads_r, grads)


def test_split_merge_round_trip_and_overlap_error():
    params = random_params(UNTIED, MOA)
    frozen, trainable = split_params(params)
    merged = merge_params(frozen, trainable)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), merged, params)
    assert count_params(frozen) + count_params(trainable) == count_params(params)
    clash = {**trainable, "final_norm": frozen["final_norm"]}
    with pytest.raises(ValueError, match="keys in both frozen and trainable: \\['final_norm/scale'\\]"):
        merge_params(frozen, clash)


# ------------------------------------------------------------------------------------------ dtypes, dropout, errors

def test_bf16_compute_returns_float32_logits():
    params = random_params(UNTIED, MOA, seed=8)
    cfg16 = dataclasses.replace(UNTIED, dtype="bfloat16")
    logits, router_logits, _ = run_batch(params, cfg16, MOA, "fixed")
    ref, ref_router, _ = run_batch(params, UNTIED, MOA, "fixed")
    assert logits.dtype == jnp.float32 and router_logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    err = np.abs(np.asarray(logits - ref)[VALID])
    scale = np.abs(np.asarray(ref)[VALID]).max()
    assert 0 < err.max() < 0.1 * scale, (err.max(), scale)    # it really ran in bf16, and stayed close


def test_dropout_needs_rng_and_changes_outputs():
    moa = dataclasses.replace(MOA, dropout=0.5)
    params = random_params(UNTIED, moa, seed=9)
    model = MoATransformer(UNTIED, moa)

    @jax.jit
    def train_mode(key):
        return model.apply({"params": params}, TOKENS, routing="fixed", expert_idx=IDX, deterministic=False,
                           rngs={"dropout": key})[0]

    # the same weights without dropout (deterministic=True is that model: AdaptedDense skips lora_dropout)
    det, _, _ = run_batch(params, UNTIED, MOA, "fixed", attn=jnp.ones((B, T), jnp.int32),
                          prompt=jnp.ones((B, T), jnp.int32))
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a, a_again, b = train_mode(k1), train_mode(k1), train_mode(k2)
    np.testing.assert_array_equal(a, a_again)
    assert np.abs(np.asarray(a - det)).max() > 1e-3 and np.abs(np.asarray(a - b)).max() > 1e-3
    with pytest.raises(InvalidRngError, match="dropout"):
        model.apply({"params": params}, TOKENS, routing="fixed", expert_idx=IDX, deterministic=False)


def test_bad_routing_mode_and_token_top_k(tiny_cfg, tiny_moa):
    params = random_params(tiny_cfg, tiny_moa)
    with pytest.raises(ValueError, match="routing='tokens' is not one of"):
        MoATransformer(tiny_cfg, tiny_moa).apply({"params": params}, TOKENS, routing="tokens")
    big_k = MoAConfig(num_experts=3, rank=4, top_k=4)                 # fine for top1 dispatch...
    with pytest.raises(ValueError, match=r"routing='token' needs MoAConfig\.top_k=4 <= num_experts=3"):
        MoATransformer(tiny_cfg, big_k).apply({"params": params}, TOKENS, routing="token")  # ...not for 'token'
