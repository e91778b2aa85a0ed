"""The routing vocabulary (moa_jax/routing.py), its one translation into model modes, the evaluation method
registry (moa_jax/methods.py) and the budget presets of experiments/registry.py."""
import pytest

from moa_jax import routing
from moa_jax.config import ConfigError, EvalConfig, ExperimentConfig, MoAConfig, parse_variant
from moa_jax.eval.evaluate import Method
from moa_jax.methods import EVAL_METHODS, METHODS, VARIANT_METHODS, method_info

# Every (dispatch, routing) pair: inference routings, then training routings.
EXPECTED = {
    ("top1", "router"): "fixed", ("soft", "router"): "soft", ("token_topk", "router"): "token",
    ("top1", "oracle"): "fixed", ("soft", "oracle"): "fixed", ("token_topk", "oracle"): "fixed",
    ("top1", "forced"): "fixed", ("soft", "forced"): "fixed", ("token_topk", "forced"): "fixed",
    ("top1", "base"): "base", ("soft", "base"): "base", ("token_topk", "base"): "base",
}
EXPECTED_TRAINING = {
    ("top1", "label"): "fixed", ("soft", "label"): "fixed", ("token_topk", "label"): "fixed",
    ("top1", "router"): "self", ("soft", "router"): "self", ("token_topk", "router"): "token",
    ("top1", "soft"): "soft", ("soft", "soft"): "soft", ("token_topk", "soft"): "soft",
}


def _moa(dispatch):
    return MoAConfig(num_experts=4, dispatch=dispatch, top_k=2)


@pytest.mark.parametrize("dispatch, name", sorted(EXPECTED))
def test_every_inference_routing_translates_to_its_mode(dispatch, name):
    assert routing.model_mode(_moa(dispatch), name) == EXPECTED[dispatch, name]
    assert routing.model_mode(None, name) == "base"          # no experts: always the base model


@pytest.mark.parametrize("dispatch, name", sorted(EXPECTED_TRAINING))
def test_every_training_routing_translates_to_its_mode(dispatch, name):
    assert routing.model_mode(_moa(dispatch), name, training=True) == EXPECTED_TRAINING[dispatch, name]


def test_the_tables_cover_every_dispatch_and_routing_and_only_model_modes():
    assert set(EXPECTED) == {(d, r) for d in routing.DISPATCH_MODES for r in routing.ROUTINGS}
    assert set(EXPECTED_TRAINING) == {(d, r) for d in routing.DISPATCH_MODES for r in routing.TRAIN_ROUTINGS}
    pass_modes = {routing.resolve(MoAConfig(num_experts=2, route_on=r)).pass_mode for r in routing.ROUTE_ON}
    assert {m for modes in routing.MODE_TABLE.values() for m in modes} | pass_modes == set(routing.MODES)


def test_every_adapted_mode_picks_its_experts_one_way_and_the_plan_agrees_with_its_spec():
    for mode, spec in routing.MODE_SPECS.items():
        picks = [spec.given_expert, spec.own_argmax, spec.sequence_gates, spec.token_gates]
        assert sum(picks) == (1 if spec.adapters else 0), mode
        assert spec.reads_routers or not spec.adapters, mode
        plan = routing.RoutePlan(mode)
        assert plan.adapters_off == (not spec.reads_routers), mode          # 'probe' reads routers, adapters off
        assert plan.needs_experts == spec.given_expert, mode
    assert routing.mode_spec("fixed").one_expert_per_row and not routing.mode_spec("soft").one_expert_per_row
    with pytest.raises(ValueError, match=r"routing='tokens' is not one of"):
        routing.mode_spec("tokens")


def test_the_routing_pass_reads_the_adapted_model_or_the_plain_base():
    assert routing.resolve(MoAConfig(num_experts=2)).pass_mode == "self"                    # the paper's pass
    assert routing.resolve(MoAConfig(num_experts=2, route_on="probe")).pass_mode == "probe"  # servable


def test_unknown_routing_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"routing='label' is not one of \('router', 'oracle', 'forced', 'base'\)"):
        routing.model_mode(_moa("top1"), "label")
    with pytest.raises(ValueError, match=r"routing='oracle' is not one of \('label', 'router', 'soft'\)"):
        routing.model_mode(_moa("top1"), "oracle", training=True)


@pytest.mark.parametrize("stage, train_routing, dispatch, mode", [
    ("stage1", "router", "top1", "fixed"),          # stage 1 follows the labels whatever train_routing says
    ("mixed_lora", "label", "top1", "fixed"),
    ("stage2", "label", "top1", "fixed"), ("stage2", "router", "top1", "self"), ("stage2", "soft", "top1", "soft"),
    ("moe_lora", "label", "token_topk", "token"),   # the token-level baseline routes itself
])
def test_each_training_stage_runs_its_mode(stage, train_routing, dispatch, mode):
    name = routing.stage_routing(stage, train_routing)
    assert routing.model_mode(_moa(dispatch), name, training=True) == mode


def test_routes_per_item_only_for_one_expert_per_sequence():
    assert routing.resolve(_moa("top1"), "router").per_item
    assert not routing.resolve(_moa("soft"), "router").per_item
    assert not routing.resolve(_moa("token_topk"), "router").per_item
    assert routing.resolve(_moa("token_topk"), "oracle").per_item and routing.resolve(None, "router").per_item


# ---- the resolver: (MoAConfig, request) -> RoutePlan ----
@pytest.mark.parametrize("route_on", routing.ROUTE_ON)
def test_resolve_gives_each_inference_request_its_plan(route_on):
    moa = MoAConfig(num_experts=4, route_on=route_on)
    pass_mode = {"adapted": "self", "probe": "probe"}[route_on]
    assert routing.resolve(moa, "router") == routing.RoutePlan("fixed", "routing_pass", pass_mode)
    assert routing.resolve(moa, "oracle") == routing.RoutePlan("fixed", "labels", pass_mode)
    assert routing.resolve(moa, "forced") == routing.RoutePlan("fixed", "expert", pass_mode)
    assert routing.resolve(moa, "base").adapters_off and routing.resolve(None, "router").adapters_off
    assert not routing.resolve(_moa("soft"), "router").cacheable and not routing.resolve(_moa("soft")).per_item


@pytest.mark.parametrize("stage, train_routing, route_on, plan", [
    ("stage1", "router", "probe", routing.RoutePlan("fixed", "labels")),       # only stage 2 reads route_on
    ("stage2", "label", "adapted", routing.RoutePlan("fixed", "labels")),
    ("stage2", "label", "probe", routing.RoutePlan("fixed", "labels", "probe", probe_loss=True)),
    ("stage2", "router", "adapted", routing.RoutePlan("self")),
    # routing with the routers on the probe pass: its decision is forced in the LM forward, as at inference
    ("stage2", "router", "probe", routing.RoutePlan("fixed", "routing_pass", "probe", probe_loss=True)),
])
def test_resolve_training_gives_each_stage_its_plan(stage, train_routing, route_on, plan):
    assert routing.resolve_training(MoAConfig(num_experts=4, route_on=route_on), stage, train_routing) == plan


def test_given_experts_are_checked():
    plan = routing.resolve(_moa("top1"), "oracle")
    assert plan.given_experts(3, 4, labels=[0, 3, 1]).tolist() == [0, 3, 1]
    assert routing.resolve(_moa("top1"), "forced").given_experts(2, 4, expert=2).tolist() == [2, 2]
    assert routing.resolve(_moa("top1"), "router").given_experts(2, 4) is None
    with pytest.raises(ValueError, match="needs expert in"):
        routing.resolve(_moa("top1"), "forced").given_experts(2, 4, expert=4)
    with pytest.raises(ValueError, match="domain must hold 3 ids"):
        plan.given_experts(3, 4, labels=[0, 1])


def test_route_on_base_of_saved_configs_reads_as_probe():
    """Configs and stage configs saved before route_on's values were renamed ('base' -> 'probe') still load, and a
    stage saved with 'base' is reusable by a run that says 'probe'."""
    from moa_jax.workflows.context import config_differences
    assert MoAConfig(route_on="base").route_on == "probe"
    saved = {"stage": "stage2", "moa": {"rank": 4, "route_on": "base"}}
    assert config_differences(saved, {"stage": "stage2", "moa": {"rank": 4, "route_on": "probe"}}) == []
    assert config_differences(saved, {"stage": "stage2", "moa": {"rank": 4, "route_on": "adapted"}}) != []


# ---- the method registry ----
def test_every_eval_method_resolves_to_one_record():
    assert EVAL_METHODS == tuple(METHODS) and set(EvalConfig().methods) <= set(EVAL_METHODS)
    for name in EVAL_METHODS:
        info = method_info(name)
        assert info.name == name and (info.routing is None or info.routing in routing.ROUTINGS)
        assert info.description
    assert set(VARIANT_METHODS) == {"moa_router", "moa_oracle", "moe_lora"}
    assert [n for n in EVAL_METHODS if METHODS[n].routing_accuracy] == ["moa_router"]
    # the trained adapters each method uses: what moa_jax/workflows/two_stage.py train_all builds
    assert {n: METHODS[n].trained for n in EVAL_METHODS} == {
        "most_common": None, "base": None, "single_lora": "single_lora", "mixed_lora": "mixed_lora",
        "moa_router": "moa", "moa_oracle": "moa", "moe_lora": "moe_lora"}


def test_a_method_takes_its_routing_and_adapters_from_the_registry():
    assert Method("moa_router").routing == "router" and Method("moa_router").trained_key == "moa"
    assert Method("single_lora").routing == "oracle" and Method("mixed_lora").routing == "forced"
    assert Method("moa_router", key="moa[eta0]", label="moa_router[eta0]").trained_key == "moa[eta0]"
    assert Method("moa_router", label="moa_router[eta0]").display == "moa_router[eta0]"
    frozen, trained = {"w": 1}, {"moa": (_moa("top1"), {"lora": 2})}
    resolved = Method("moa_oracle").resolve(frozen, trained)
    assert resolved.moa == _moa("top1") and resolved.params == {"w": 1, "lora": 2}
    base = Method("base").resolve(frozen, trained)
    assert base.moa is None and base.params is frozen


def test_unknown_method_names_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match=r"EvalConfig.methods: unknown \['moa'\]; valid: \('most_common', "
                                          r"'base', 'single_lora', 'mixed_lora', 'moa_router', 'moa_oracle', "
                                          r"'moe_lora'\)"):
        EvalConfig(methods=("base", "moa"))
    with pytest.raises(ConfigError, match=r"each must be one of \('moa_router', 'moa_oracle', 'moe_lora'\)"):
        parse_variant("v: stage2.eta=0; methods=moa_router+base")
    with pytest.raises(KeyError, match=r"unknown evaluation method 'moa'; valid: \('most_common'"):
        method_info("moa")
    with pytest.raises(KeyError, match="valid"):
        Method("moa").routing


# ---- budgets: chosen by the preset's name, never by the backend ----
CPU = (80, 40, 8, 20, "domain")             # rows packed with examples of one domain
ACCELERATOR = (1500, 500, 32, 200, "none")


def _budget(exp: ExperimentConfig) -> tuple:
    return exp.stage1.steps, exp.stage2.steps, exp.data.batch_size, exp.eval.items_per_domain, exp.data.packing


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_presets_choose_their_budget_on_every_backend(backend, monkeypatch):
    import jax
    from experiments.registry import get_experiment
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert _budget(get_experiment("moa_10task")) == CPU
    assert _budget(get_experiment("moa_10task_ablations")) == CPU
    assert _budget(get_experiment("moa_10task_accel")) == ACCELERATOR
    assert _budget(get_experiment("moa_10task_ablations_accel")) == ACCELERATOR


def test_cpu_and_accelerator_presets_differ_only_in_budget_and_name():
    import dataclasses
    from experiments.registry import get_experiment
    cpu, accel = get_experiment("moa_10task"), get_experiment("moa_10task_accel")
    same = dataclasses.replace(accel, name=cpu.name, data=cpu.data, stage1=cpu.stage1, stage2=cpu.stage2,
                               baseline=cpu.baseline, eval=cpu.eval)
    assert same == cpu
    assert {accel.stage1.adam_b2, accel.stage2.adam_b2, accel.baseline.adam_b2} == {0.95}   # the budget's b2
    assert {cpu.stage1.adam_b2, cpu.stage2.adam_b2, cpu.baseline.adam_b2} == {0.999}
    assert dataclasses.replace(accel.baseline, adam_b2=0.999) == cpu.baseline
    assert accel.eval.batch_size == 100 and cpu.eval.batch_size == 50
    ablations = get_experiment("moa_10task_ablations_accel")
    assert ablations.variants == get_experiment("moa_10task_ablations").variants and ablations.variants
