"""The hand-written LoRA backward (`lora.low_rank`, used by every dispatch path) equals plain autodiff of
((x @ a) * gate) @ b: values and gradients w.r.t. x, a, b and the gate, for scalar, per-token and per-group gates."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.nn.lora import low_rank

G, N, DIN, K, DOUT = 2, 5, 6, 3, 4


def _plain(x, a, b, gate):
    return jnp.einsum("gnk,gko->gno", jnp.einsum("gnd,gdk->gnk", x, a) * gate, b)


@pytest.mark.parametrize("gate_shape", [(1, 1, 1), (G, N, K), (G, 1, K)])
def test_low_rank_matches_autodiff(gate_shape):
    rng = np.random.default_rng(0)
    x, a, b, gate, proj = (jnp.asarray(rng.normal(size=s), jnp.float32)
                           for s in ((G, N, DIN), (G, DIN, K), (G, K, DOUT), gate_shape, (G, N, DOUT)))

    @jax.jit
    def both(x, a, b, gate):
        loss = lambda f: lambda *args: jnp.sum(f(*args) * proj)
        return (low_rank(x, a, b, gate), _plain(x, a, b, gate),
                jax.grad(loss(low_rank), argnums=(0, 1, 2, 3))(x, a, b, gate),
                jax.grad(loss(_plain), argnums=(0, 1, 2, 3))(x, a, b, gate))

    out, ref, grads, ref_grads = both(x, a, b, gate)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("x", "a", "b", "gate"), grads, ref_grads):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"grad {name}")


def test_merged_lora_matmul_matches_autodiff_including_kernel_grad():
    from moa_jax.nn.lora import merged_lora_matmul
    rng = np.random.default_rng(1)
    x, w, a, b, proj = (jnp.asarray(rng.normal(size=s), jnp.float32)
                        for s in ((N, DIN), (DIN, DOUT), (DIN, K), (K, DOUT), (N, DOUT)))
    plain = lambda x, w, a, b: x @ w + 1.5 * (x @ a) @ b

    @jax.jit
    def both(x, w, a, b):
        loss = lambda f: lambda *args: jnp.sum(f(*args) * proj)
        merged = lambda x, w, a, b: merged_lora_matmul(x, w, a, b, 1.5)
        return (merged(x, w, a, b), plain(x, w, a, b), jax.grad(loss(merged), argnums=(0, 1, 2, 3))(x, w, a, b),
                jax.grad(loss(plain), argnums=(0, 1, 2, 3))(x, w, a, b))

    out, ref, grads, ref_grads = both(x, w, a, b)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("x", "kernel", "a", "b"), grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"grad {name}")


def test_adapted_dense_merged_path_equals_two_gemm_path(monkeypatch):
    """Enough tokens take the merged single-expert GEMM; forcing the two-GEMM path gives the same output and
    gradients (E=1 top-1 and 'single' routes)."""
    import moa_jax.nn.lora as lora
    layer = lora.AdaptedDense(features=DOUT, num_experts=1, rank=K, scale=2.0, use_bias=True)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 16, DIN)), jnp.float32)
    assert lora.merge_is_cheaper(48, DIN, DOUT, jnp.float32)
    params = layer.init(jax.random.PRNGKey(0), x, lora.Route.single())["params"]
    params = {**params, "lora_b": jnp.asarray(rng.normal(size=params["lora_b"].shape), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=params["bias"].shape), jnp.float32)}

    def run(route):
        f = lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x, route)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)

    routes = (lora.Route.single(), lora.Route.top1(jnp.zeros((3,), jnp.int32)))
    merged = [run(r) for r in routes]
    monkeypatch.setattr(lora, "merge_is_cheaper", lambda *a: False)
    unmerged = [run(r) for r in routes]
    for got, want in zip(merged, unmerged):
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [16, 1])   # 48 tokens take the merged GEMM, 3 tokens (decoding) the two GEMMs
@pytest.mark.parametrize("idx", [(2, 2, 2), (0, 2, 3)])
def test_adapted_dense_one_expert_batch_branch_equals_gather_path(monkeypatch, tokens, idx):
    """A forward-only top-1 route over E > 1 experts branches (lax.cond) to the single-expert path when the whole
    batch runs one expert; values and gradients equal the gather path's, for uniform and mixed batches. Training
    (deterministic=False) never branches."""
    import moa_jax.nn.lora as lora
    layer = lora.AdaptedDense(features=DOUT, num_experts=4, rank=K, scale=2.0, use_bias=True)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, tokens, DIN)), jnp.float32)
    assert lora.merge_is_cheaper(x.size // DIN, DIN, DOUT, jnp.float32) == (tokens == 16)
    route = lora.Route.top1(jnp.asarray(idx, jnp.int32))
    params = layer.init(jax.random.PRNGKey(0), x, route)["params"]
    params = {**params, "lora_b": jnp.asarray(rng.normal(size=params["lora_b"].shape), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=params["bias"].shape), jnp.float32)}
    def loss(det=True):   # a new function per trace: jax caches traces by function
        return lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x, route, deterministic=det)))

    assert "cond" in str(jax.make_jaxpr(loss())(params, x))
    assert "cond" not in str(jax.make_jaxpr(loss(False))(params, x))
    branched = jax.jit(jax.value_and_grad(loss(), argnums=(0, 1)))(params, x)
    monkeypatch.setattr(lora, "may_share_expert", lambda *a: False)
    assert "cond" not in str(jax.make_jaxpr(loss())(params, x))
    gathered = jax.jit(jax.value_and_grad(loss(), argnums=(0, 1)))(params, x)
    for g, w in zip(jax.tree_util.tree_leaves(branched), jax.tree_util.tree_leaves(gathered)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
