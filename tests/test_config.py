"""Bad configuration values raise ConfigError (a ValueError) naming the field; good edge cases construct."""
import pytest

from moa_jax.config import EXPERTS_FROM_DATA, ConfigError, MoAConfig, normalize_targets
from tests.conftest import make_tiny_cfg


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=-1), r"MoAConfig\.num_experts must be >= 1 \(or 0: one per domain of the data\), got -1"),
    (dict(rank=0), r"MoAConfig\.rank must be >= 1, got 0"),
    (dict(targets=("q_proj", "qq")), r"MoAConfig\.targets: unknown projection 'qq'"),
    (dict(targets=()), r"MoAConfig\.targets is empty"),
    (dict(dispatch="ragged"), r"MoAConfig\.dispatch='ragged'"),
    (dict(dispatch="token_topk", num_experts=3, top_k=4), r"MoAConfig\.top_k=4 must be <= num_experts=3"),
    (dict(top_k=0), r"MoAConfig\.top_k must be >= 1"),
    (dict(dropout=1.0), r"MoAConfig\.dropout"),
    (dict(router_type="conv"), r"MoAConfig\.router_type='conv'"),
    (dict(decision="median"), r"MoAConfig\.decision='median'"),
])
def test_bad_moa_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MoAConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=4, num_kv_heads=3), r"ModelConfig\.num_heads=4 is not a multiple of num_kv_heads=3"),
    (dict(num_kv_heads=0), r"ModelConfig\.num_kv_heads must be > 0"),
    (dict(hidden_size=30), r"ModelConfig\.hidden_size=30 is not divisible by num_heads=4"),
    (dict(dtype="float8"), r"ModelConfig\.dtype='float8'"),
])
def test_bad_model_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_tiny_cfg(**kwargs)


def test_single_expert_is_a_valid_plain_lora():
    """E=1 with the default top_k=2 is valid: top_k is checked only for token_topk dispatch, which uses it."""
    moa = MoAConfig(num_experts=1)
    assert moa.num_experts == 1 and moa.top_k == 2
    MoAConfig(num_experts=1, dispatch="soft")
    MoAConfig(num_experts=2, dispatch="token_topk", top_k=2)


def test_num_experts_follows_the_data_unless_set():
    """Unset (0), the expert count is the data's domain count; a set count must equal it; a model is never built
    with it unset."""
    from moa_jax.params import param_shapes
    assert MoAConfig().num_experts == EXPERTS_FROM_DATA
    assert MoAConfig(rank=4).for_domains(("math", "geo")) == MoAConfig(num_experts=2, rank=4)
    assert MoAConfig(num_experts=2).for_domains(("math", "geo")).num_experts == 2
    with pytest.raises(ConfigError, match=r"^moa\.num_experts=4 but the data has 2 domains \['math', 'geo'\]: MoA "
                       r"trains one expert per domain; leave moa\.num_experts unset \(it follows the data\) or "
                       r"--set moa\.num_experts=2$"):
        MoAConfig(num_experts=4).for_domains(("math", "geo"))
    with pytest.raises(ConfigError, match=r"MoAConfig\.top_k=2 must be <= num_experts=1"):   # re-validated
        MoAConfig(dispatch="token_topk").for_domains(("one",))
    with pytest.raises(ConfigError, match=r"MoAConfig\.num_experts is unset .* set num_experts"):
        param_shapes(make_tiny_cfg(), MoAConfig(rank=4))


def test_targets_normalised_and_scale():
    assert normalize_targets("q,v") == ("q_proj", "v_proj")
    assert normalize_targets(("down", "q_proj")) == ("q_proj", "down_proj")   # model order
    assert MoAConfig(targets="all").targets == normalize_targets(("q", "k", "v", "o", "gate", "up", "down"))
    assert MoAConfig(rank=16, alpha=32.0).scale == 2.0
    assert MoAConfig(rank=16, alpha=32.0, use_rslora=True).scale == 8.0


def test_soft_dispatch_with_router_evaluation_is_refused_before_training():
    from moa_jax.config import EvalConfig, ExperimentConfig
    with pytest.raises(ConfigError, match=r"moa.dispatch='soft' with eval.methods containing 'moa_router'"):
        ExperimentConfig(moa=MoAConfig(num_experts=4, dispatch="soft"))
    ok = ExperimentConfig(moa=MoAConfig(num_experts=4, dispatch="soft"), eval=EvalConfig(methods=("base",)))
    assert ok.moa.dispatch == "soft"


@pytest.mark.parametrize("assignment", ["stage1.checkpoint_every=0", "stage2.log_every=0", "baseline.log_every=-1",
                                        "moe_lora.keep_checkpoints=0"])
def test_every_step_count_must_be_at_least_one(assignment):
    """0 would divide by zero mid-stage, so it is refused up front; the error names the field and the --set key."""
    from moa_jax.config import ExperimentConfig
    from moa_jax.overrides import apply_overrides
    key = assignment.split("=")[0]
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{key.split('.')[1]} must be >= 1, got -?\d; e\.g\. "
                                          rf"--set {key}=10"):
        apply_overrides(ExperimentConfig(), [assignment])


def test_router_fit_is_a_stage2_option_on_routers_that_read_the_base_model():
    from moa_jax.config import ExperimentConfig, TrainConfig
    with pytest.raises(ConfigError, match=r"stage2\.router_fit_prompts=8 fits routers that read the plain base model, "
                       r"but moa\.route_on='adapted'; set moa\.route_on=probe"):
        ExperimentConfig(stage2=TrainConfig(stage="stage2", router_fit_prompts=8))
    with pytest.raises(ConfigError, match=r"router_fit_prompts is a stage-2 option .* set stage2\.router_fit_prompts"):
        TrainConfig(stage="stage1", router_fit_prompts=8)
    with pytest.raises(ConfigError, match=r"TrainConfig\.router_fit_prompts must be >= 0, got -1"):
        TrainConfig(stage="stage2", router_fit_prompts=-1)
    ok = ExperimentConfig(moa=MoAConfig(route_on="probe"), stage2=TrainConfig(stage="stage2", router_fit_prompts=8))
    assert ok.stage2.router_fit_prompts == 8
