"""What training shows and logs besides the loss: the learning rate of every logged step is the one the optimizer
applied, and the progress bar names the LM loss and the router accuracy (never the summed objective `loss`)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moa_jax.config import TrainConfig
from moa_jax.train.metrics_log import progress_fields
from moa_jax.train.step import logged_learning_rates, make_optimizer


def _applied_rates(tcfg: TrainConfig, steps: int) -> dict[str, list[float]]:
    """Step size per update and group, measured from the optimizer itself: Adam on a constant gradient of 1 moves
    every parameter by exactly -lr (bias-corrected m / sqrt(v) = 1; weight decay 0)."""
    params = {"layers": {"lora_a": jnp.zeros((1, 2, 3, 1))}, "router": {"kernel": jnp.zeros((1, 3, 2))}}
    tx = make_optimizer(tcfg, params)
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    out = {"expert": [], "router": []}
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        out["expert"].append(-float(np.asarray(updates["layers"]["lora_a"]).mean()))
        out["router"].append(-float(np.asarray(updates["router"]["kernel"]).mean()))
        params = optax.apply_updates(params, updates)
    return out


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_logged_learning_rate_is_the_applied_one(stage):
    tcfg = TrainConfig(stage=stage, steps=10, learning_rate=1e-2, warmup_frac=0.3, end_lr_frac=0.1,
                       router_lr_mult=10.0, weight_decay=0.0, grad_clip=1e9)
    applied = _applied_rates(tcfg, tcfg.steps)
    logged = [logged_learning_rates(tcfg, step) for step in range(1, tcfg.steps + 1)]
    np.testing.assert_allclose([r["learning_rate"] for r in logged], applied["expert"], rtol=1e-4, atol=1e-9)
    if stage == "stage1":   # routers are frozen in stage 1: no router learning rate is logged
        assert all(set(r) == {"learning_rate"} for r in logged) and max(applied["router"]) == 0.0
    else:
        np.testing.assert_allclose([r["learning_rate_router"] for r in logged], applied["router"], rtol=1e-4,
                                   atol=1e-9)
    rates = [r["learning_rate"] for r in logged]
    assert rates[0] == 0.0 and max(rates) == pytest.approx(1e-2) and rates[-1] < rates[3]   # warmup, then decay


def test_stage2_with_frozen_experts_logs_only_the_router_rate():
    tcfg = TrainConfig(stage="stage2", steps=4, learning_rate=1e-3, router_lr_mult=5.0, freeze_experts=True)
    assert set(logged_learning_rates(tcfg, 2)) == {"learning_rate_router"}


def test_progress_bar_shows_lm_loss_and_router_accuracy_not_the_objective():
    stage1 = {"loss": 23.416, "lm_loss": 2.6162, "tokens_per_s": 1000.0}
    assert progress_fields(stage1) == {"lm_loss": "2.616"}
    stage2 = {"loss": 4.1, "lm_loss": 2.5, "router_loss": 1.6, "router_acc": 0.875}
    assert progress_fields(stage2) == {"lm_loss": "2.500", "router_acc": "0.875"}
