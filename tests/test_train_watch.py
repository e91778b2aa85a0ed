"""Watching a run while it trains: the validation loss every TrainConfig.eval_every steps (a console line, metrics.jsonl
and TensorBoard `eval/` keys), the best adapters kept beside the final ones and named in the report, the option to
evaluate them (eval.adapters=best), and the optional Weights & Biases hook. Validation must not change training:
the same run with and without it ends bit-identical."""
import functools
import json
import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.config import ConfigError, EvalConfig, ExperimentConfig, TrainConfig
from moa_jax.data.tasks import DOMAIN_NAMES
from moa_jax.nn.model import MoATransformer
from moa_jax.train.checkpoint import BEST_ADAPTERS, load_adapters, read_best, save_best
from moa_jax.train.metrics_log import train_tag
from moa_jax.train.step import loss_fn, validation_metrics
from moa_jax.train.wandb_log import WandbLog
from tests.conftest import SMOKE_VARIANT
from tests.train_helpers import (SyntheticSource, compile_cache, init_trees, make_train_config,  # noqa: F401
                                 max_abs_diff, no_tensorboard, run_stage, tiny_cfg, tiny_moa)
from tests.test_eval_smoke import _tb_scalars

NUMBER = r"\d+\.\d+"


class FakeWandb(types.ModuleType):
    """A stand-in `wandb` module that records what a run was told: init's arguments, define_metric and log calls."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def define_metric(self, name, **kwargs):
        self.calls.append(("define_metric", (name, kwargs)))

    def log(self, data):
        self.calls.append(("log", dict(data)))

    def finish(self):
        self.calls.append(("finish", None))


# ---- a tiny stage trained with and without validation -----------------------------------------------------------

@pytest.fixture(scope="module")
def watched_pair(tmp_path_factory, compile_cache):  # noqa: F811
    """The same stage-2 run (dropout on: training draws from its RNG) without and with validation every step
    (log every 2 steps, 3 steps: step 1 validates between log steps), the latter logging to a fake W&B run.
    -> (plain final, plain history, watched workdir, watched final, watched history, fake wandb)."""
    had_tb = "tensorboardX" in sys.modules
    saved_tb = sys.modules.get("tensorboardX")
    no_tensorboard()   # JSONL only here (TensorBoard is the smoke run's test); restored below for the session
    try:
        return _watched_pair(tmp_path_factory)
    finally:
        if had_tb:
            sys.modules["tensorboardX"] = saved_tb
        else:
            sys.modules.pop("tensorboardX", None)


def _watched_pair(tmp_path_factory):
    moa = tiny_moa(dropout=0.1)
    plain_cfg = make_train_config(steps=3, log_every=2)
    watched_cfg = make_train_config(steps=3, log_every=2, eval_every=1, eval_batches=2)
    plain, plain_hist = run_stage(tmp_path_factory.mktemp("plain"), plain_cfg, moa, SyntheticSource())
    fake = FakeWandb()
    sys.modules["wandb"] = fake
    try:
        sink = WandbLog("proj", name="tiny", config={"a": 1}, directory=str(tmp_path_factory.getbasetemp()))
    finally:
        del sys.modules["wandb"]
    workdir = tmp_path_factory.mktemp("watched")
    watched, hist = run_stage(workdir, watched_cfg, moa, SyntheticSource(), validation=SyntheticSource(seed=7),
                              on_log=functools.partial(sink.log, "stage2"))
    sink.finish()
    return plain, plain_hist, workdir, watched, hist, fake


def _train_part(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("eval/") and k not in ("tokens_per_s", "seconds")}


def test_validation_leaves_training_bit_identical(watched_pair):
    plain, plain_hist, _, watched, hist, _ = watched_pair
    assert max_abs_diff(plain, watched) == 0.0
    train_rows = [_train_part(r) for r in hist if "lm_loss" in r]
    assert train_rows == [_train_part(r) for r in plain_hist] and [r["step"] for r in train_rows] == [2, 3]


def test_validation_rows_and_the_best_adapters(watched_pair):
    _, _, workdir, final, hist, _ = watched_pair
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows == [{k: v for k, v in r.items()} for r in hist]
    assert "lm_loss" not in rows[0] and "lm_loss" in rows[1]   # step 1: validation only, between log steps
    for r in rows:
        assert {"eval/loss", "eval/lm_loss", "eval/router_loss", "eval/router_acc", "eval/loss/d0",
                "eval/loss/d1"} <= set(r)
        assert r["eval/loss"] == pytest.approx(r["eval/lm_loss"] + r["eval/router_loss"])   # stage 2, eta 1
    losses = [r["eval/loss"] for r in rows]
    assert losses[2] < losses[0]   # the synthetic domains are learnable: validation improves
    best = read_best(os.fspath(workdir))
    assert best["step"] == 1 + int(np.argmin(losses)) == 3 and best["loss"] == min(losses)
    kept, saved = load_adapters(os.path.join(workdir, BEST_ADAPTERS))
    assert max_abs_diff(kept, final) == 0.0 and saved["validation"]["step"] == 3


def test_wandb_gets_every_row_on_the_stage_s_own_step_axis(watched_pair):
    _, _, workdir, _, hist, fake = watched_pair
    kinds = [c[0] for c in fake.calls]
    assert kinds[0] == "init" and kinds[-1] == "finish"
    assert fake.calls[0][1]["project"] == "proj" and fake.calls[0][1]["config"] == {"a": 1}
    assert [c[1] for c in fake.calls if c[0] == "define_metric"] == [
        ("stage2/step", {}), ("stage2/*", {"step_metric": "stage2/step"})]
    logged = [c[1] for c in fake.calls if c[0] == "log"]
    assert [d["stage2/step"] for d in logged] == [r["step"] for r in hist] == [1, 2, 3]
    for data, row in zip(logged, hist):
        assert set(data) == {"stage2/step"} | {f"stage2/{train_tag(k)}" for k in row if k != "step"}
        assert data["stage2/eval/lm_loss"] == pytest.approx(row["eval/lm_loss"])
    assert logged[1]["stage2/train/lm_loss"] == pytest.approx(hist[1]["lm_loss"])
    assert "stage2/train/lm_loss" not in logged[0]


def test_validation_metrics_pool_the_batches():
    """Two copies of one batch give that batch's loss_fn values: the LM loss per token, router accuracy and the
    objective (lm + eta x router CE); per-domain sums doubled."""
    cfg, moa = tiny_cfg(), tiny_moa()
    frozen, trainable = init_trees(cfg, moa)
    model, tcfg = MoATransformer(cfg, moa), TrainConfig(stage="stage2", eta=0.5)
    batch = {k: jnp.asarray(v) for k, v in SyntheticSource().batch(0).items()}
    _, one = loss_fn(trainable, frozen, batch, None, model=model, tcfg=tcfg, num_domains=2)
    both = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), batch)
    out = validation_metrics(trainable, frozen, both, model=model, tcfg=tcfg, num_domains=2)
    lm = float(one["lm_loss_sum"] / one["tokens"])
    assert float(out["lm_loss"]) == pytest.approx(lm, rel=1e-6)
    assert float(out["router_acc"]) == pytest.approx(float(one["router_acc"]))
    assert float(out["loss"]) == pytest.approx(lm + 0.5 * float(one["router_loss"]), rel=1e-6)
    np.testing.assert_allclose(out["domain_loss_sum"], 2 * np.asarray(one["domain_loss_sum"]), rtol=1e-6)


# ---- the smoke run (the session fixture) ---------------------------------------------------------------------

def test_smoke_run_validates_logs_and_reports_the_best_step(smoke):
    workdir, console = smoke
    res = json.load(open(os.path.join(workdir, "results.json")))
    assert res["evaluated_adapters"] == "final"
    variant = "variants/" + SMOKE_VARIANT.split(":")[0] + "/stage2"
    assert set(res["validation"]) == {"stage1", "stage2", "mixed_lora", variant}
    md = open(os.path.join(workdir, "results.md")).read()
    for stage, every in (("stage1", 1), ("stage2", 1), ("mixed_lora", 2), (variant, 1)):
        rows = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]
        val = [r for r in rows if "eval/loss" in r]
        assert [r["step"] for r in val] == list(range(every, rows[-1]["step"] + 1, every)), stage
        best = min(val, key=lambda r: r["eval/loss"])
        assert res["validation"][stage]["best_step"] == best["step"], stage
        assert res["validation"][stage]["best_loss"] == pytest.approx(best["eval/loss"])
        assert read_best(os.path.join(workdir, stage))["step"] == best["step"]
        assert f"| {stage} | {best['step']} | {best['eval/loss']:.4f} |" in md
        routers = stage.endswith("stage2")
        assert ("eval/router_acc" in best) == routers
        assert {f"eval/loss/{d}" for d in DOMAIN_NAMES} <= set(best)
        lines = [line for line in console.splitlines() if line.startswith(f"{stage} validation step ")]
        assert len(lines) == len(val), stage
        for line, r in zip(lines, val):
            want = (rf"{stage} validation step {r['step']}/{rows[-1]['step']}: loss {NUMBER} lm_loss {NUMBER}"
                    + (rf" router_loss {NUMBER} router_acc {NUMBER}" if routers else "") + r" \| best step \d+")
            assert re.fullmatch(want, line), (line, want)
            assert f"lm_loss {r['eval/lm_loss']:.4f}" in line
        tb = _tb_scalars(os.path.join(workdir, stage, "tensorboard"))
        assert tb["eval/lm_loss"] == [(r["step"], pytest.approx(r["eval/lm_loss"])) for r in val]


# ---- configuration and errors --------------------------------------------------------------------------------

def test_eval_every_and_best_adapters_settings_are_checked():
    with pytest.raises(ConfigError, match="eval_every must be >= 0"):
        TrainConfig(eval_every=-1)
    with pytest.raises(ConfigError, match="eval_batches must be >= 1"):
        TrainConfig(eval_batches=0)
    with pytest.raises(ConfigError, match="adapters='last' not in"):
        EvalConfig(adapters="last")
    with pytest.raises(ConfigError, match=r"stage1.eval_every, stage2.eval_every, baseline.eval_every is 0"):
        ExperimentConfig(eval=EvalConfig(adapters="best"))
    on = TrainConfig(stage="stage1", eval_every=5)
    ExperimentConfig(stage1=on, stage2=TrainConfig(eval_every=5), eval=EvalConfig(adapters="best",
                     methods=("single_lora", "moa_router")))


def test_wandb_without_the_package_is_one_error_line_before_training(tmp_path, monkeypatch, capsys):
    from experiments import run
    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError
    workdir = tmp_path / "run"
    assert run.main(["--exp=smoke", f"--workdir={workdir}", "--no_progress", "--set", "wandb=my-project"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: wandb='my-project'") and "pip install wandb" in err[0]
    assert not (workdir / "stage1").exists() and not (workdir / "config.json").exists()


def test_best_adapters_replace_each_trained_stage(tmp_path):
    """eval.adapters=best: every trained stage's entry becomes its best_adapters (variants included); a stage
    without a record is an error naming it; stage-1 experts imported from PEFT (no stage folder) stay."""
    from types import SimpleNamespace

    from moa_jax.errors import UserError
    from moa_jax.workflows.two_stage import best_adapters
    tree = lambda v: {"layers": {"lora_a": np.full((1, 2), v, np.float32)}}   # noqa: E731
    dirs = {label: str(tmp_path / label) for label in ("stage1", "stage2", "variants/eta0/stage2")}
    for i, d in enumerate(dirs.values()):
        save_best(d, tree(10.0 + i), {"stage": "x"}, {"step": i + 1, "loss": 1.0, "metrics": {}})
    ctx = SimpleNamespace(stage_dirs=dirs)
    trained = {"single_lora": ("m1", tree(0.0)), "moa": ("m2", tree(0.0)), "moa[eta0]": ("m3", tree(0.0))}
    out = best_adapters(ctx, trained)
    assert {k: (m, float(t["layers"]["lora_a"][0, 0])) for k, (m, t) in out.items()} == {
        "single_lora": ("m1", 10.0), "moa": ("m2", 11.0), "moa[eta0]": ("m3", 12.0)}
    imported = best_adapters(SimpleNamespace(stage_dirs={"stage2": dirs["stage2"]}), {"single_lora": ("m1", tree(5.0))})
    assert float(imported["single_lora"][1]["layers"]["lora_a"][0, 0]) == 5.0
    with pytest.raises(UserError, match="stage mixed_lora has no best adapters"):
        best_adapters(SimpleNamespace(stage_dirs={"mixed_lora": str(tmp_path / "none")}),
                      {"mixed_lora": ("m", tree(0.0))})
