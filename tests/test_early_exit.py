"""Early-exit routing, calibration and abstention (MoAConfig.exit_layer, temperature, abstain_below, fallback) on the
tiny test model, without a training run:
  - a routing pass cut after layer k gives the full pass's first k router logits, and k = L the full decision;
  - the decision with a temperature and a threshold (moa_jax.nn.router.decide_or_abstain) against hand-derived
    values, and against the numpy copies in moa_jax/eval/calibration.py and moa_jax/reference_router.py;
  - the calibration helpers: the temperature fit recovers a known temperature, ECE and the two rules by hand;
  - generation of a prompt that abstains equals generation with its fall-back forced (base model or an expert).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax import reference_router
from moa_jax.config import ConfigError, MoAConfig
from moa_jax.eval import calibration
from moa_jax.generate.decode import generate_tokens, route_from_prompt
from moa_jax.nn.entry import ModelInputs, routing_pass
from moa_jax.nn.model import MoATransformer
from moa_jax.nn.router import decide, decide_or_abstain
from moa_jax.params import merge_params
from moa_jax.routing import routing_policy
from tests.conftest import make_tiny_cfg, make_tiny_moa
from tests.train_helpers import init_trees


def _model(layers=3, **moa_changes):
    """A tiny model (L=3) whose experts are non-zero, so each expert and the base model answer differently."""
    cfg, moa = make_tiny_cfg(num_layers=layers), make_tiny_moa(**moa_changes)
    frozen, trainable = init_trees(cfg, moa)          # lora_b drawn non-zero
    return cfg, moa, jax.tree_util.tree_map(jnp.asarray, merge_params(frozen, trainable))


def _prompts(batch=6, length=10):
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (batch, length), 3, 60), np.int32)
    mask = np.ones_like(tokens)
    mask[0, :4] = 0    # one left-padded row
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.mark.parametrize("mode", ["probe", "self"])
def test_early_exit_logits_equal_the_full_pass_first_k(mode):
    cfg, moa, params = _model()
    tokens, mask = _prompts()
    x = ModelInputs(tokens, mask)
    model = MoATransformer(cfg, moa)
    full = np.asarray(routing_pass(model, params, x, mode=mode))                            # (L, B, E)
    assert full.shape == (3, 6, moa.num_experts)
    for k in range(1, cfg.num_layers + 1):
        cut = np.asarray(routing_pass(model, params, x, mode=mode, exit_layer=k))           # (k, B, E)
        assert cut.shape == (k, 6, moa.num_experts)
        np.testing.assert_allclose(cut, full[:k], atol=1e-5, rtol=1e-5)


def test_exit_at_the_last_layer_is_the_full_decision():
    cfg, moa, params = _model(route_on="probe")
    tokens, mask = _prompts()
    for decision in ("last", "vote"):
        base = dataclasses.replace(moa, decision=decision)
        full_idx, full_logits = route_from_prompt(cfg, base, params, tokens, mask)
        idx, logits = route_from_prompt(cfg, dataclasses.replace(base, exit_layer=cfg.num_layers), params, tokens,
                                        mask)
        assert np.array_equal(np.asarray(idx), np.asarray(full_idx))
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(full_logits))
        # an exit after layer 1: router 1 alone decides
        idx1, logits1 = route_from_prompt(cfg, dataclasses.replace(base, exit_layer=1), params, tokens, mask)
        assert np.array_equal(np.asarray(idx1), np.argmax(np.asarray(full_logits)[0], -1))


def test_routing_settings_are_validated():
    with pytest.raises(ConfigError, match=r"MoAConfig.exit_layer=-2"):
        MoAConfig(exit_layer=-2)
    with pytest.raises(ConfigError, match=r"MoAConfig.abstain_below=1.5"):
        MoAConfig(abstain_below=1.5)
    with pytest.raises(ConfigError, match=r"MoAConfig.temperature=0"):
        MoAConfig(temperature=0)
    with pytest.raises(ConfigError, match=r"abstain_below needs dispatch='top1'"):
        MoAConfig(abstain_below=0.5, dispatch="soft")
    with pytest.raises(ValueError, match=r"exit_layer=4 but the model has 3 layers"):
        routing_policy(MoAConfig(num_experts=3, exit_layer=4), 3)
    with pytest.raises(ValueError, match=r"fallback='nope' is neither 'base' nor an expert name"):
        routing_policy(MoAConfig(num_experts=3, fallback="nope"), 3, ("a", "b", "c"))
    assert routing_policy(MoAConfig(num_experts=3, fallback="b"), 3, ("a", "b", "c")).fallback == 1


def test_decide_or_abstain_by_hand():
    # one router, two sequences: logits (ln 3, 0) -> p = (0.75, 0.25); (0, 0) -> p = (0.5, 0.5), argmax 0
    logits = jnp.asarray([[[np.log(3.0), 0.0], [0.0, 0.0]]], jnp.float32)                  # (1, 2, 2)
    idx, conf = decide_or_abstain(logits, "last", 1.0, 0.6, -1)
    assert np.asarray(idx).tolist() == [0, -1]
    np.testing.assert_allclose(np.asarray(conf), [0.75, 0.5], atol=1e-6)
    # T = 2 halves the logits: p = sqrt(3) / (sqrt(3) + 1) = 0.634 for the first sequence
    idx, conf = decide_or_abstain(logits, "last", 2.0, 0.7, 1)
    np.testing.assert_allclose(np.asarray(conf)[0], np.sqrt(3) / (np.sqrt(3) + 1), atol=1e-6)
    assert np.asarray(idx).tolist() == [1, 1]   # both below 0.7: the named fall-back, expert 1


@pytest.mark.parametrize("policy", ["last", "vote"])
def test_the_numpy_decisions_match_the_model(policy):
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 64, 5)) * 2.0, np.float32)   # (k, N, E)
    _, conf = decide_or_abstain(jnp.asarray(logits), policy, 1.7)
    threshold = float(np.median(np.asarray(conf)))
    idx, conf = decide_or_abstain(jnp.asarray(logits), policy, 1.7, threshold, -1)
    idx, conf = np.asarray(idx), np.asarray(conf)
    assert 0 < (idx == -1).sum() < 64          # some abstain, some do not: the comparison can fail
    np.testing.assert_array_equal(calibration.decide(logits, policy), np.asarray(decide(jnp.asarray(logits), policy)))
    np.testing.assert_allclose(calibration.confidence(logits, policy, 1.7), conf, atol=1e-5)
    for n in range(64):
        ref_idx, ref_conf = reference_router.decide_or_abstain(logits[:, n], policy, 1.7, threshold, -1)
        assert ref_idx == idx[n] and abs(ref_conf - conf[n]) < 1e-5


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1, 4000, 6)) * 3.0                                                  # (1, N, E)
    p = calibration.softmax(z[0] / 2.5)
    labels = np.asarray([rng.choice(6, p=row) for row in p])
    fitted = calibration.fit_temperature(z, labels, "last")
    assert abs(fitted - 2.5) < 0.25, fitted
    assert calibration.nll(z, labels, "last", fitted) < calibration.nll(z, labels, "last", 1.0)


def test_ece_and_the_rules_by_hand():
    conf = np.asarray([0.95, 0.95, 0.55, 0.55])
    correct = np.asarray([True, False, True, True])
    # bin (0.9, 1]: accuracy 0.5 vs confidence 0.95; bin (0.5, 0.6]: 1.0 vs 0.55 -> 0.5 * 0.45 + 0.5 * 0.45
    assert abs(calibration.expected_calibration_error(conf, correct) - 0.45) < 1e-12
    assert calibration.pick_exit_layer([0.80, 0.948, 0.95, 0.93], 0.5) == 2
    assert calibration.pick_exit_layer([0.80, 0.94, 0.95, 0.93], 0.5) == 3
    c = np.asarray([0.9, 0.2, 0.5, 0.7, 0.8, 0.6, 0.4, 0.3, 0.95, 0.85])
    t = calibration.pick_threshold(c, 0.8)                   # the largest t keeping 8 of the 10 at or above it
    assert t == 0.4 and (c >= t).mean() >= 0.8 and (c > t).mean() < 0.8
    assert calibration.abstention_stats(c, c > 0.5, t) == {"coverage": 0.8, "accuracy_routed": 0.75,
                                                            "accuracy_all": 0.6}


def _generate(cfg, moa, params, tokens, mask, **kw):
    out, idx, _ = generate_tokens(cfg, moa, params, tokens, mask, max_new_tokens=6, eos_ids=(999,), **kw)
    return np.asarray(out), np.asarray(idx)


def test_an_abstained_prompt_generates_with_its_fallback():
    cfg, moa, params = _model(route_on="probe")
    tokens, mask = _prompts()
    names = ("a", "b", "c")
    base, _ = _generate(cfg, moa, params, tokens, mask, routing="base")
    forced, _ = _generate(cfg, moa, params, tokens, mask, routing="forced", expert=2)
    routed, chosen = _generate(cfg, moa, params, tokens, mask)
    assert (base != routed).any(axis=1).all() or (base != forced).any()   # the fall-backs answer differently
    # every prompt abstains (a confidence is below 1): the base model, or the named expert, answers
    everyone = dataclasses.replace(moa, abstain_below=1.0)
    out, idx = _generate(cfg, everyone, params, tokens, mask, names=names)
    assert (idx == -1).all()
    np.testing.assert_array_equal(out, base)
    out, idx = _generate(cfg, dataclasses.replace(everyone, fallback="c"), params, tokens, mask, names=names)
    assert (idx == 2).all()
    np.testing.assert_array_equal(out, forced)
    # a threshold between the confidences: the abstained rows are the base model's, the others the router's
    _, logits = route_from_prompt(cfg, moa, params, tokens, mask)
    conf = calibration.confidence(np.asarray(logits), "last", 1.0)
    some = dataclasses.replace(moa, abstain_below=float(np.median(conf)))
    out, idx = _generate(cfg, some, params, tokens, mask)
    off = conf < np.median(conf)
    assert off.any() and (~off).any()
    assert (idx[off] == -1).all() and (idx[~off] == chosen[~off]).all()
    np.testing.assert_array_equal(out[off], base[off])
    np.testing.assert_array_equal(out[~off], routed[~off])
