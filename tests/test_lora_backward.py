"""The hand-written LoRA backward (`lora.low_rank`, used by every dispatch path) equals plain autodiff of
((x @ a) * gate) @ b: values and gradients w.r.t. x, a, b and the gate, for scalar, per-token and per-group gates."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.lora import low_rank

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
