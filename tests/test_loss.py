"""`lm_loss_terms` (logsumexp minus the picked logit) equals the log-softmax + gather definition: values and the
gradient w.r.t. the logits, per-domain sums and counts."""
import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.train.step import lm_loss_terms


def _reference(logits, tokens, loss_mask):
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return nll, loss_mask[:, 1:].astype(jnp.float32)


def test_lm_loss_terms_matches_log_softmax_gather():
    rng = np.random.default_rng(0)
    b, t, v, n = 3, 7, 11, 2
    logits = jnp.asarray(3 * rng.normal(size=(b, t, v)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (b, t)), jnp.int32)
    domain = jnp.asarray([0, 1, 1], jnp.int32)

    @jax.jit
    def both(logits):
        nll, w, dom_sum, dom_cnt = lm_loss_terms(logits[:, :-1], tokens[:, 1:], mask[:, 1:], domain, n)
        ref_nll, ref_w = _reference(logits, tokens, mask)
        grad = jax.grad(lambda l: jnp.sum(lm_loss_terms(l[:, :-1], tokens[:, 1:], mask[:, 1:], domain, n)[0] * w))(logits)
        ref_grad = jax.grad(lambda l: jnp.sum(_reference(l, tokens, mask)[0] * ref_w))(logits)
        return nll, w, dom_sum, dom_cnt, ref_nll, ref_w, grad, ref_grad

    nll, w, dom_sum, dom_cnt, ref_nll, ref_w, grad, ref_grad = both(logits)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(w, ref_w)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
    per_row = np.sum(np.asarray(ref_nll) * np.asarray(ref_w), axis=1)
    np.testing.assert_allclose(dom_sum, [per_row[0], per_row[1] + per_row[2]], rtol=1e-5)
    np.testing.assert_allclose(dom_cnt, [np.sum(ref_w[0]), np.sum(ref_w[1:])])
