"""Every LoRA dispatch path against `lora_loop_reference` and an independent numpy loop (forward and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.nn.lora import (AdaptedDense, Route, lora_delta, lora_loop_reference, lora_mixture, lora_single,
                          lora_top1)

B, T, DIN, DOUT, E, R = 3, 5, 8, 6, 4, 2
SCALE = 1.7
TOL = dict(rtol=1e-5, atol=1e-5)


def _arrays(seed=0, num_experts=E):
    """Inputs from numpy's generator (no threefry compiles); the last item is the generator, for more."""
    rng = np.random.default_rng(seed)
    x, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((B, T, DIN), (num_experts, DIN, R), (num_experts, R, DOUT)))
    proj = jnp.asarray(rng.normal(size=(B, T, DOUT)), jnp.float32)  # random projection of the output -> loss
    return x, a, b, proj, rng


def _np_forward(x, a, b, w):
    """out[b,t] = SCALE * sum_e w[b,t,e] * x[b,t] @ A[e] @ B[e], by explicit loops in float64."""
    x, a, b, w = (np.asarray(v, np.float64) for v in (x, a, b, w))
    out = np.zeros(x.shape[:2] + (b.shape[-1],))
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            for e in range(a.shape[0]):
                out[i, t] += w[i, t, e] * (x[i, t] @ a[e] @ b[e])
    return SCALE * out


def _np_grads(x, a, b, w, p):
    """Analytic gradients of sum(P * out) w.r.t. x, A, B and the weights w, in float64."""
    x, a, b, w, p = (np.asarray(v, np.float64) for v in (x, a, b, w, p))
    gx = np.zeros_like(x)
    ga, gb, gw = np.zeros_like(a), np.zeros_like(b), np.zeros_like(w)
    for e in range(a.shape[0]):
        we = w[..., e:e + 1]                                        # (B, T, 1)
        gx += SCALE * we * (p @ b[e].T @ a[e].T)
        ga[e] = SCALE * np.einsum("btd,btr->dr", we * x, p @ b[e].T)
        gb[e] = SCALE * np.einsum("btr,bto->ro", we * (x @ a[e]), p)
        gw[..., e] = SCALE * np.sum(p * (x @ a[e] @ b[e]), axis=-1)
    return gx, ga, gb, gw


def _check_against_references(fn, x, a, b, w_bte, proj, extra=()):
    """fn(x, a, b, *extra) -> [B,T,Dout]; weights w_bte [B,T,E] describe the same mixture for the references."""
    def loss(x, a, b, *extra):
        return jnp.sum(fn(x, a, b, *extra) * proj)

    def ref_loss(x, a, b):
        return jnp.sum(lora_loop_reference(x, a, b, w_bte, SCALE) * proj)

    @jax.jit  # one compile per check instead of one per eager op
    def compute(x, a, b, *extra):
        return (fn(x, a, b, *extra), lora_loop_reference(x, a, b, w_bte, SCALE),
                jax.grad(loss, argnums=(0, 1, 2))(x, a, b, *extra), jax.grad(ref_loss, argnums=(0, 1, 2))(x, a, b))

    out, ref_out, grads, ref = compute(x, a, b, *extra)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(out, _np_forward(x, a, b, w_bte), **TOL)
    np_ref = _np_grads(x, a, b, w_bte, proj)[:3]
    for name, g, r, n in zip(("x", "lora_a", "lora_b"), grads, ref, np_ref):
        np.testing.assert_allclose(g, r, err_msg=f"grad {name} vs loop reference", **TOL)
        np.testing.assert_allclose(g, n, err_msg=f"grad {name} vs numpy", **TOL)
    return out


def test_single_equals_references():
    x, a, b, proj, _ = _arrays()
    for expert in (0, 2):
        w = jnp.broadcast_to(jax.nn.one_hot(expert, E), (B, T, E))
        _check_against_references(lambda x, a, b: lora_single(x, a, b, SCALE, expert), x, a, b, w, proj)


def test_top1_equals_references():
    x, a, b, proj, _ = _arrays()
    idx = jnp.array([2, 0, 2])
    w = jnp.broadcast_to(jax.nn.one_hot(idx, E)[:, None], (B, T, E))
    _check_against_references(lambda x, a, b: lora_top1(x, a, b, idx, SCALE), x, a, b, w, proj)


@pytest.mark.parametrize("per_token", [False, True], ids=["gates_BE", "gates_BTE"])
def test_mixture_equals_references(per_token):
    x, a, b, proj, rng = _arrays()
    shape = (B, T, E) if per_token else (B, E)
    gates = jax.nn.softmax(jnp.asarray(rng.normal(size=shape), jnp.float32), -1)
    w = gates if per_token else jnp.broadcast_to(gates[:, None], (B, T, E))
    _check_against_references(lambda x, a, b, g: lora_mixture(x, a, b, g, SCALE), x, a, b, w, proj, (gates,))

    # gradient w.r.t. the gates (soft routing trains the router through them)
    g_gates = jax.grad(lambda g: jnp.sum(lora_mixture(x, a, b, g, SCALE) * proj))(gates)
    np_gw = _np_grads(x, a, b, w, proj)[3]
    np.testing.assert_allclose(g_gates, np_gw if per_token else np_gw.sum(axis=1), **TOL)


def test_top1_with_one_hot_gates_equals_mixture():
    x, a, b, _, _ = _arrays(seed=1)
    idx = jnp.array([1, 3, 0])
    np.testing.assert_allclose(lora_top1(x, a, b, idx, SCALE),
                               lora_mixture(x, a, b, jax.nn.one_hot(idx, E), SCALE), **TOL)


def test_single_expert_route_equals_top1():
    """E=1: `lora_delta` takes the 2-D `lora_single` path for a top1 route; it must equal the gather path."""
    x, a, b, _, _ = _arrays(seed=2, num_experts=1)
    idx = jnp.zeros((B,), jnp.int32)
    out = lora_delta(x, a, b, Route.top1(idx), SCALE)
    np.testing.assert_allclose(out, lora_top1(x, a, b, idx, SCALE), **TOL)
    np.testing.assert_allclose(out, lora_delta(x, a, b, Route.single(), SCALE), **TOL)


def test_top1_gradient_only_reaches_own_expert():
    x, a, b, proj, _ = _arrays(seed=3)
    idx = jnp.array([1, 3, 1])
    @jax.jit
    def grads(a, b, sample):
        def loss(a, b):
            return jnp.sum(lora_top1(x, a, b, idx, SCALE)[sample] * proj[sample])
        return jax.grad(loss, argnums=(0, 1))(a, b)

    for sample in range(B):
        ga, gb = (np.asarray(g) for g in grads(a, b, sample))
        own = int(idx[sample])
        others = [e for e in range(E) if e != own]
        assert np.all(ga[others] == 0) and np.all(gb[others] == 0)
        assert np.abs(ga[own]).max() > 0 and np.abs(gb[own]).max() > 0


def test_lora_delta_refuses_the_adapters_off_route():
    x, a, b, _, _ = _arrays()
    with pytest.raises(ValueError, match="no LoRA delta"):
        lora_delta(x, a, b, Route.off(), SCALE)


def test_adapted_dense_with_zero_lora_b_is_plain_dense():
    x, _, _, _, _ = _arrays()
    route = Route.top1(jnp.array([0, 1, 2]))
    layer = AdaptedDense(features=DOUT, use_bias=False, num_experts=E, rank=R, scale=SCALE)
    params = layer.init(jax.random.PRNGKey(0), x, route)["params"]
    assert set(params) == {"kernel", "lora_a", "lora_b"}
    assert params["lora_a"].shape == (E, DIN, R) and params["lora_b"].shape == (E, R, DOUT)
    assert np.all(np.asarray(params["lora_b"]) == 0) and np.abs(params["lora_a"]).max() > 0
    assert np.abs(params["lora_a"]).max() <= 1 / np.sqrt(DIN)          # PEFT's kaiming-uniform bound
    biased = AdaptedDense(features=DOUT, use_bias=True, num_experts=E, rank=R, scale=SCALE)
    bias = jnp.arange(DOUT, dtype=jnp.float32)                          # non-zero, so the test sees it
    for lyr, p, expected in ((layer, params, x @ params["kernel"]),
                             (biased, {**params, "bias": bias}, x @ params["kernel"] + bias)):
        for r in (route, Route.off(), Route.mixture(jnp.full((B, E), 1.0 / E))):
            np.testing.assert_array_equal(lyr.apply({"params": p}, x, r), expected)

    # ... and with non-zero lora_b the delta is exactly the dispatch function's
    params = {**params, "lora_b": jnp.asarray(np.random.default_rng(1).normal(size=params["lora_b"].shape),
                                              jnp.float32)}
    np.testing.assert_allclose(layer.apply({"params": params}, x, route) - x @ params["kernel"],
                               lora_top1(x, params["lora_a"], params["lora_b"], route.expert_idx, SCALE), **TOL)


# ------------------------------------------------------------------------------------------------ LoRA dropout
def test_lora_dropout_keeps_the_rate_and_the_mean_with_independent_masks():
    """lora_dropout (keyed-hash bits): the drop rate is `rate` (within 5 sigma over 2^20 elements), kept elements are
    scaled so the mean is preserved, the 16-bit numbers are uniform (chi-square over 16 bins), neighbouring
    elements and different keys are uncorrelated, and the same key reproduces the mask."""
    from moa_jax.nn.lora import dropout_bits, lora_dropout
    shape, rate = (4, 256, 1024), 0.05
    x = jnp.ones(shape, jnp.float32)
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    out = np.asarray(jax.jit(lora_dropout, static_argnums=1)(x, rate, k1))
    n = out.size
    dropped = (out == 0).mean()
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n), dropped
    assert np.allclose(out[out != 0], 1 / (1 - round(rate * 65536) / 65536))
    assert abs(out.mean() - 1.0) < 5 * np.sqrt(rate / (1 - rate) / n)
    bits = np.asarray(dropout_bits(k1, shape)).ravel().astype(np.int64)
    counts = np.bincount(bits >> 12, minlength=16)
    chi2 = (((counts - n / 16) ** 2) / (n / 16)).sum()
    assert chi2 < 60, chi2                                # 15 degrees of freedom: p < 1e-6 above 60
    masks = [(np.asarray(lora_dropout(x, rate, k)) == 0).ravel().astype(np.float64) for k in (k1, k2)]
    assert abs(np.corrcoef(masks[0][:-1], masks[0][1:])[0, 1]) < 0.01     # neighbours (same 32-bit word too)
    assert abs(np.corrcoef(masks[0], masks[1])[0, 1]) < 0.01             # two keys
    np.testing.assert_array_equal(np.asarray(lora_dropout(x, rate, k1)), out)
    assert lora_dropout(x, 0.0, k1) is x
