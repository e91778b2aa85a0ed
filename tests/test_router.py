"""Router math: prompt-masked pooling, losses and decision policies vs numpy and hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.nn.router import (Router, decide, load_balancing_loss, masked_mean_pool, router_accuracy,
                            router_ce_loss, top_k_gates)

LN2 = math.log(2.0)

# A fixed example, logits [L=2, B=3, E=3], labels [0, 2, 1]. softmax([ln2, 0, 0]) = [1/2, 1/4, 1/4], so each
# (layer, sample) costs ln2 (label has the ln2 logit, a hit) or ln4 = 2 ln2 (label has logit 0, a miss):
#   sample 0: layer 0 [ln2, 0, 0] -> ln2 hit    layer 1 [0, ln2, 0] -> 2ln2 miss
#   sample 1: layer 0 [ln2, 0, 0] -> 2ln2 miss  layer 1 [0, 0, ln2] -> ln2 hit
#   sample 2: layer 0 [0, ln2, 0] -> ln2 hit    layer 1 [0, ln2, 0] -> ln2 hit
FIXED_LOGITS = jnp.array([[[LN2, 0, 0], [LN2, 0, 0], [0, LN2, 0]],
                          [[0, LN2, 0], [0, 0, LN2], [0, LN2, 0]]], jnp.float32)
FIXED_LABELS = jnp.array([0, 2, 1])


def test_masked_mean_pool_matches_numpy():
    h = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 4)), jnp.float32)
    mask = jnp.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 1, 1]])
    got = masked_mean_pool(h, mask)
    hn = np.asarray(h)
    expected = np.stack([hn[0, :2].mean(0), np.zeros(4), hn[2, [1, 3, 4]].mean(0)])
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], np.zeros(4))   # an all-zero mask row pools to zeros (not NaN)


def test_masked_mean_pool_bf16_input_pools_in_float32():
    h = jnp.full((1, 3, 2), 1.0 + 2.0 ** -7, jnp.bfloat16)   # exactly representable in bf16
    got = masked_mean_pool(h, jnp.ones((1, 3)))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, np.full((1, 2), 1.0 + 2.0 ** -7, np.float32))


def test_router_ce_loss_hand_computed():
    np.testing.assert_allclose(router_ce_loss(FIXED_LOGITS, FIXED_LABELS), 8 * LN2 / 6, rtol=1e-6)
    # valid samples 0, 1 only: (1 + 2 + 2 + 1) ln2 / 4
    np.testing.assert_allclose(router_ce_loss(FIXED_LOGITS, FIXED_LABELS, jnp.array([1, 1, 0])), 1.5 * LN2,
                               rtol=1e-6)
    np.testing.assert_allclose(router_ce_loss(FIXED_LOGITS, FIXED_LABELS, jnp.array([0, 0, 1])), LN2, rtol=1e-6)
    # no valid sample: 0, not NaN
    assert float(router_ce_loss(FIXED_LOGITS, FIXED_LABELS, jnp.zeros(3))) == 0.0


def test_router_ce_loss_ignores_labels_of_invalid_samples():
    """Regression: an out-of-range label (e.g. a padding sentinel) on a masked-out sample made the loss NaN,
    because the gather filled NaN and NaN * 0 = NaN. The loss and its gradient must not depend on it."""
    valid = jnp.array([1, 1, 0])
    expected = router_ce_loss(FIXED_LOGITS, jnp.array([0, 2, 0]), valid)
    for pad_label in (-1, 3, 1000):
        labels = jnp.array([0, 2, pad_label])
        np.testing.assert_allclose(router_ce_loss(FIXED_LOGITS, labels, valid), expected, rtol=1e-6)
        grad = jax.grad(router_ce_loss)(FIXED_LOGITS, labels, valid)
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[:, 2] == 0)


def test_router_accuracy_hand_computed():
    assert float(router_accuracy(FIXED_LOGITS, FIXED_LABELS)) == pytest.approx(4 / 6)
    assert float(router_accuracy(FIXED_LOGITS, FIXED_LABELS, jnp.array([1, 1, 0]))) == pytest.approx(0.5)
    assert float(router_accuracy(FIXED_LOGITS, FIXED_LABELS, jnp.array([0, 0, 1]))) == pytest.approx(1.0)


def test_decide_last_and_vote():
    # L=3, B=2, E=3.
    # sample 0: layers' argmax 2, 2, 0 (last layer very confident in 0): last -> 0; vote -> 2 (majority wins
    #           over the tie-break term however confident the minority layer is).
    # sample 1: argmax 1, 2, 0, a three-way tie; summed probabilities: expert 2 (layer 1 is ~certain)
    #           1.37 > expert 0 1.23 > expert 1 -> vote 2; last -> 0.
    logits = jnp.array([[[0, 0, 0.1], [0, 0.1, 0]],
                        [[0, 0, 0.1], [0, 0, 8.0]],
                        [[100.0, 0, 0], [3.0, 0, 0]]], jnp.float32)
    np.testing.assert_array_equal(decide(logits, "last"), [0, 0])
    np.testing.assert_array_equal(decide(logits, "vote"), [2, 2])
    assert decide(logits, "vote").dtype == jnp.int32 and decide(logits, "last").dtype == jnp.int32
    with pytest.raises(ValueError, match="policy 'median'"):
        decide(logits, "median")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_gates(k):
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 6)), jnp.float32)
    gates, probs, chosen = top_k_gates(logits, k)
    g, p, lg = np.asarray(gates), np.asarray(probs), np.asarray(logits)
    np.testing.assert_allclose(p, jax.nn.softmax(logits, -1), rtol=1e-6)
    np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-6)
    assert np.all((g != 0).sum(-1) == k)
    top = np.argsort(-lg, axis=-1)[..., :k]
    np.testing.assert_array_equal(np.sort(np.asarray(chosen), -1), np.sort(top, -1))
    expected = np.zeros_like(p)
    np.put_along_axis(expected, top, np.take_along_axis(p, top, -1), -1)
    np.testing.assert_allclose(g, expected / expected.sum(-1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss(k):
    b, t, e = 2, 4, 4
    slot = np.arange(b * t).reshape(b, t)
    chosen = jnp.asarray(np.stack([(slot + j) % e for j in range(k)], -1))          # every expert equally often
    uniform = jnp.full((b, t, e), 1.0 / e)
    mask = jnp.ones((b, t))
    np.testing.assert_allclose(load_balancing_loss(uniform, chosen, mask), 1.0, rtol=1e-6)

    collapsed_p = jnp.broadcast_to(jax.nn.one_hot(0, e), (b, t, e))
    collapsed_c = jnp.asarray(np.stack([np.full((b, t), j) for j in range(k)], -1))  # experts 0..k-1 always
    loss = float(load_balancing_loss(collapsed_p, collapsed_c, mask))
    assert loss > 1.0
    np.testing.assert_allclose(loss, e / k, rtol=1e-6)   # f_0 = 1/k, P_0 = 1

    # masked tokens do not count: collapsed routing on masked-out tokens leaves a balanced loss at 1
    probs = jnp.concatenate([uniform, collapsed_p], axis=1)
    ch = jnp.concatenate([chosen, collapsed_c], axis=1)
    m = jnp.concatenate([mask, jnp.zeros((b, t))], axis=1)
    np.testing.assert_allclose(load_balancing_loss(probs, ch, m), 1.0, rtol=1e-6)


@pytest.mark.parametrize("router_type", ["linear", "mlp"])
def test_router_module_outputs_float32(router_type):
    router = Router(num_experts=3, router_type=router_type, hidden=8)
    x = jnp.ones((2, 4), jnp.bfloat16)
    params = router.init(jax.random.PRNGKey(0), x)["params"]
    out = router.apply({"params": params}, x)
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    if router_type == "linear":
        assert set(params) == {"kernel"} and params["kernel"].shape == (4, 3)
        np.testing.assert_allclose(out, np.ones((2, 4)) @ np.asarray(params["kernel"]), rtol=1e-6)
    else:
        assert set(params) == {"hidden", "out"}
