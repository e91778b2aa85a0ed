"""MoAConfig.route_on='probe' (servable routing) on the tiny test model, without a training run:
  - config: bad values and combinations are refused naming the field; the variant key is accepted;
  - the model's 'probe' mode: router logits of the plain base forward, independent of the adapters, equal to the
    adapted routing pass when the adapters are zero;
  - route_from_prompt honours route_on; its decision is decide() of the probe logits;
  - stage 2: the router CE is the CE of the probe logits, and it sends no gradient into the experts (it does with
    route_on='adapted', whose routers read hidden states the experts change).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.config import ConfigError, ExperimentConfig, MoAConfig, TrainConfig, parse_variant, replace
from moa_jax.generate.decode import route_from_prompt
from moa_jax.nn.model import MoATransformer
from moa_jax.nn.router import decide, router_ce_loss
from moa_jax.params import merge_params
from moa_jax.train.step import loss_fn
from tests.train_helpers import SyntheticSource, init_trees, tiny_cfg, tiny_moa


def test_route_on_is_validated_naming_the_field():
    with pytest.raises(ConfigError, match=r"MoAConfig.route_on='plain' not in \('adapted', 'probe'\)"):
        MoAConfig(route_on="plain")
    with pytest.raises(ConfigError, match=r"route_on='probe' needs dispatch='top1'"):
        MoAConfig(route_on="probe", dispatch="soft")
    with pytest.raises(ConfigError, match=r"stage2.train_routing='soft'"):
        ExperimentConfig(moa=MoAConfig(route_on="probe"), stage2=TrainConfig(stage="stage2", train_routing="soft"))
    assert parse_variant("servable: moa.route_on=probe; methods=moa_router").sets == ("moa.route_on=probe",)


def _batch():
    b = SyntheticSource(batch_size=4, num_domains=2).batch(0)
    return {k: jnp.asarray(v) for k, v in b.items()}


def _router_logits(cfg, moa, params, batch, routing):
    _, aux = MoATransformer(cfg, moa).apply({"params": params}, batch["tokens"],
                                            attention_mask=batch["attention_mask"],
                                            prompt_mask=batch["prompt_mask"], routing=routing)
    return np.asarray(aux["router_logits"])                                             # (L, B, E)


def test_probe_mode_reads_the_base_model_only():
    cfg, moa = tiny_cfg(), tiny_moa()
    frozen, trainable = init_trees(cfg, moa)
    batch = _batch()
    params = merge_params(frozen, trainable)
    probe = _router_logits(cfg, moa, params, batch, "probe")
    adapted = _router_logits(cfg, moa, params, batch, "self")
    assert probe.shape == (cfg.num_layers, 4, moa.num_experts)
    # layer 0 reads the embeddings in both passes; deeper layers read hidden states the experts change
    np.testing.assert_allclose(probe[0], adapted[0], atol=1e-6)
    assert np.max(np.abs(probe[1] - adapted[1])) > 1e-4
    zero = jax.tree_util.tree_map(lambda x: x, trainable)
    for group in zero["layers"].values():
        for proj in group.values():
            if isinstance(proj, dict) and "lora_b" in proj:
                proj["lora_b"] = np.zeros_like(proj["lora_b"])
    zero_params = merge_params(frozen, zero)
    np.testing.assert_allclose(_router_logits(cfg, moa, zero_params, batch, "probe"), probe, atol=1e-6)
    np.testing.assert_allclose(_router_logits(cfg, moa, zero_params, batch, "self"), probe, atol=1e-5)


def test_route_from_prompt_honours_route_on():
    cfg, moa = tiny_cfg(), tiny_moa()
    frozen, trainable = init_trees(cfg, moa)
    params = merge_params(frozen, trainable)
    batch = _batch()
    for route_on, mode in (("adapted", "self"), ("probe", "probe")):
        m = replace(moa, route_on=route_on)
        idx, logits = route_from_prompt(cfg, m, params, batch["tokens"], batch["attention_mask"],
                                        batch["prompt_mask"])
        expected = _router_logits(cfg, m, params, batch, mode)
        np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)
        assert (np.asarray(idx) == np.asarray(decide(jnp.asarray(expected), m.decision))).all()


def _grads(moa, eta):
    cfg = tiny_cfg()
    frozen, trainable = init_trees(cfg, moa)
    tcfg = TrainConfig(stage="stage2", eta=eta)
    fn = jax.grad(loss_fn, has_aux=True)
    grads, metrics = fn(trainable, frozen, _batch(), jax.random.PRNGKey(0), model=MoATransformer(cfg, moa),
                        tcfg=tcfg, num_domains=moa.num_experts)
    return grads, metrics, cfg, frozen, trainable


def _expert_grads(grads) -> np.ndarray:
    flat = {k: v for k, v in jax.tree_util.tree_leaves_with_path(grads) if "router" not in jax.tree_util.keystr(k)}
    return np.concatenate([np.ravel(np.asarray(v)) for v in flat.values()])


def test_stage2_router_loss_is_taken_on_the_base_pass():
    moa = replace(tiny_moa(), route_on="probe")
    grads, metrics, cfg, frozen, trainable = _grads(moa, eta=1.0)
    batch = _batch()
    probe = _router_logits(cfg, moa, merge_params(frozen, trainable), batch, "probe")
    expected = router_ce_loss(jnp.asarray(probe), batch["domain"], batch["valid"])
    assert float(metrics["router_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert np.max(np.abs(np.asarray(grads["layers"]["router"]["kernel"]))) > 0
    # the router CE reaches the routers only: expert gradients equal those of the LM loss alone (eta = 0)
    no_ce, *_ = _grads(moa, eta=0.0)
    np.testing.assert_allclose(_expert_grads(grads), _expert_grads(no_ce), atol=1e-7)
    # whereas routers on the adapted pass read hidden states the experts change: the CE moves the experts too
    adapted = dataclasses.replace(moa, route_on="adapted")
    a1, *_ = _grads(adapted, eta=1.0)
    a0, *_ = _grads(adapted, eta=0.0)
    assert np.max(np.abs(_expert_grads(a1) - _expert_grads(a0))) > 1e-6


def test_stage2_router_routing_uses_the_base_pass_decision():
    """train_routing=router with route_on=probe: the LM forward runs each sequence with the expert the base pass
    decides (as inference will), i.e. label routing with those experts as labels."""
    cfg, moa = tiny_cfg(), replace(tiny_moa(), route_on="probe")
    frozen, trainable = init_trees(cfg, moa)
    batch = _batch()
    probe = _router_logits(cfg, moa, merge_params(frozen, trainable), batch, "probe")
    decided = decide(jnp.asarray(probe), moa.decision)
    model = MoATransformer(cfg, moa)

    def lm_sum(tcfg, b):
        _, m = loss_fn(trainable, frozen, b, jax.random.PRNGKey(0), model=model, tcfg=tcfg, num_domains=2)
        return float(m["lm_loss_sum"])
    routed = lm_sum(TrainConfig(stage="stage2", train_routing="router"), batch)
    assert routed == pytest.approx(lm_sum(TrainConfig(stage="stage2"), {**batch, "domain": decided}), rel=1e-6)
    flipped = {**batch, "domain": 1 - decided}
    assert abs(routed - lm_sum(TrainConfig(stage="stage2"), flipped)) > 1e-4 * abs(routed)
