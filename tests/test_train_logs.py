"""What training shows and logs besides the loss: the learning rate of every logged step is the one the optimizer
applied, the progress bar names the LM loss and the router accuracy (never the summed objective `loss`), and every
logged step is one console line (losses, router accuracy, throughput, ETA)."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moa_jax.config import TrainConfig
from moa_jax.train.metrics_log import log_line, progress_fields
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


def test_without_progress_bar_each_logged_step_is_one_console_line(smoke):
    """The session's smoke run (--no_progress, every step logged): per stage, one console line per metrics.jsonl
    row, with the losses, the router accuracy where routers train, the throughput and, before the last step, the
    ETA."""
    workdir, console = smoke
    number, stages = r"\d+\.\d+", ("stage1", "stage2", "mixed_lora", "variants/eta0/stage2")
    for stage in stages:
        rows = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]
        lines = [line for line in console.splitlines() if line.startswith(f"{stage} step ")]
        total = rows[-1]["step"]
        assert len(lines) == len(rows) == total, (stage, lines)   # smoke logs every step
        routers = stage.endswith("stage2")
        for line, row in zip(lines, rows):
            want = (rf"{stage} step {row['step']}/{total}: loss {number} lm_loss {number}"
                    + (rf" router_loss {number} router_acc {number}" if routers else "") + r" \| \d+ tokens/s"
                    + (r" \| ETA \d+:\d\d:\d\d" if row["step"] < total else ""))
            assert re.fullmatch(want, line), (line, want)
            assert f"lm_loss {row['lm_loss']:.4f}" in line


def test_log_line_shows_each_stage_s_losses_and_the_eta():
    stage1 = {"loss": 23.41649, "lm_loss": 2.61621, "tokens_per_s": 1234.4, "seconds": 10.0}
    assert log_line("stage1", 20, 80, stage1, 10) == (
        "stage1 step 20/80: loss 23.4165 lm_loss 2.6162 | 1234 tokens/s | ETA 0:01:00")
    moe = {"loss": 2.6, "lm_loss": 2.5, "balance_loss": 1.01, "tokens_per_s": 10.0, "seconds": 3600.0}
    assert log_line("moe_lora", 1, 3, moe, 1) == (
        "moe_lora step 1/3: loss 2.6000 lm_loss 2.5000 balance_loss 1.0100 | 10 tokens/s | ETA 2:00:00")
