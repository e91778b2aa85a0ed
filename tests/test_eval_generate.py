"""Routed generation on a tiny random model whose experts and routers are randomised (so experts differ and
different prompts pick different experts):
  - routing consistency: generating with the router == generating with the chosen expert forced;
  - a left-padded mixed-domain batch == the same prompts generated one by one (evaluation's batching path).
"""
import numpy as np
import pytest

from moa_jax.config import ModelConfig, MoAConfig
from moa_jax.eval.evaluate import Method, generate_answers
from moa_jax.generate.decode import generate_tokens, left_pad
from tests.train_helpers import randomised_model

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  name="tiny-gen-test")
MOA = MoAConfig(num_experts=4, rank=4, alpha=8.0, dropout=0.0)
EOS = (1,)
NEW = 6
LENGTHS = (5, 9, 14, 3, 20, 7, 11, 17)   # padded together to 32; alone to 16 or 32


@pytest.fixture(scope="module")
def params():
    """Random base; lora_b (zero at init) and routers drawn large enough that experts and routes differ."""
    return randomised_model(CFG, MOA, router_scale=2.0)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(2, CFG.vocab_size, size=n).tolist() for n in LENGTHS]


def test_router_generation_equals_forced_chosen_expert(params, prompts):
    tokens, mask = left_pad(prompts, pad_id=0)
    out, chosen, logits = generate_tokens(CFG, MOA, params, tokens, mask, routing="router", max_new_tokens=NEW,
                                          eos_ids=EOS)
    assert logits.shape == (CFG.num_layers, len(prompts), MOA.num_experts)
    np.testing.assert_array_equal(chosen, np.argmax(np.asarray(logits)[-1], -1))   # decision 'last'
    assert len(set(chosen.tolist())) >= 2, f"the routers sent every prompt to one expert {chosen}: test is vacuous"
    forced = {}
    for e in range(MOA.num_experts):
        forced[e], idx, _ = generate_tokens(CFG, MOA, params, tokens, mask, routing="forced", expert=e,
                                            max_new_tokens=NEW, eos_ids=EOS)
        assert (idx == e).all()
        rows = chosen == e
        np.testing.assert_array_equal(out[rows], forced[e][rows], err_msg=f"expert {e}")
    # the experts really differ (otherwise the equality above proves nothing)
    assert sum(not np.array_equal(forced[0], forced[e]) for e in range(1, MOA.num_experts)) >= 2


def test_mixed_domain_batch_equals_one_by_one(params, prompts):
    domains = np.arange(len(prompts)) % MOA.num_experts          # a different expert in neighbouring rows
    method = Method("moa_oracle", MOA, params)
    as_text = lambda ids: " ".join(map(str, ids))                # noqa: E731
    batched, used = generate_answers(CFG, method, prompts, domains, pad_id=0, eos_ids=EOS, max_new_tokens=NEW,
                                     batch_size=3, decode=as_text)     # 3 + 3 + 2 (padded with copies)
    np.testing.assert_array_equal(used, domains)
    for p, d, text in zip(prompts, domains, batched):
        tokens, mask = left_pad([p], pad_id=0)
        out, _, _ = generate_tokens(CFG, MOA, params, tokens, mask, routing="oracle", domain=[d],
                                    max_new_tokens=NEW, eos_ids=EOS)
        ids = out[0].tolist()
        ids = ids[:ids.index(EOS[0])] if EOS[0] in ids else ids
        assert as_text(ids) == text, f"prompt of {len(p)} tokens, expert {d}"
    # different experts answer the same prompt differently (so mixing them in one batch is a real test)
    again, _ = generate_answers(CFG, method, prompts[:3], (domains[:3] + 1) % MOA.num_experts, pad_id=0,
                                eos_ids=EOS, max_new_tokens=NEW, batch_size=3, decode=as_text)
    assert again != batched[:3]
