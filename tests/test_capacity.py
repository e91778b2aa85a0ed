"""The capacity study end to end at smoke scale (tiny random Llama, tiny data, 10 domains, main rank 4,
capacity.rank 2), through `python -m experiments.run`, reusing the session's smoke run as the main arm:
  - the capacity table has the four arms with their ranks (4, 2, 2, 10 x 2 = 20), in results.json and results.md;
  - trainable parameters and inference FLOPs per token match counts computed here from the tiny model's shapes;
  - PPL is over eval.ppl_items_per_domain items, accuracy over the generation items;
  - the main arm's stage 1 and stage 2 come from reuse_from; a mixed-LoRA arm trains no MoA stage.
"""
import contextlib
import io
import json
import os

import pytest

from experiments import run
from moa_jax.workflows import resolve_job
from moa_jax.workflows.capacity import plan_arms
from moa_jax.workflows.sections import CapacityConfig
from experiments.registry import moa_10task_capacity, smoke as smoke_preset
from moa_jax.config import ConfigError, EvalConfig, replace
from moa_jax.data.tasks import DOMAIN_NAMES

# The tiny random Llama (moa_jax/loading/base.py): D = 64, F = 128, 4 heads and 2 kv heads of 16, L = 2.
D, F, KV, L = 64, 128, 32, 2
# Din + Dout of the seven adapted projections: q, k, v, o, gate, up, down.
SIDES = (D + D) + (D + KV) + (D + KV) + (D + D) + (D + F) + (D + F) + (F + D)
PPL_ITEMS = 3


@pytest.fixture(scope="module")
def study(smoke, tmp_path_factory):
    base, _ = smoke
    workdir = str(tmp_path_factory.mktemp("capacity"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = run.main(["--exp=smoke", f"--workdir={workdir}", "--no_progress", "--set", "capacity.rank=2",
                       "--set", f"reuse_from={base}", "--set", "eval.items_per_domain=1",
                       "--set", f"eval.ppl_items_per_domain={PPL_ITEMS}"])
    assert rc == 0
    return workdir, json.load(open(os.path.join(workdir, "results.json")))


def test_table_rows_ranks_and_parameter_counts(study):
    _, res = study
    rows = res["capacity"]["rows"]
    assert [(r["method"], r["rank"]) for r in rows] == [("moa_router", 4), ("moa_router[r2]", 2),
                                                        ("mixed_lora[r2]", 2), ("mixed_lora[r20]", 20)]
    e = len(DOMAIN_NAMES)
    lora = lambda rank, experts: L * experts * rank * SIDES   # noqa: E731
    router = L * D * e   # one bias-free linear router [D, E] per layer
    assert [r["trainable_params"] for r in rows] == [lora(4, e) + router, lora(2, e) + router, lora(2, 1),
                                                     lora(20, 1)]
    assert rows[3]["trainable_params"] == rows[1]["trainable_params"] - router   # parameter-matched
    # one adapter per token: FLOPs differ from the base only by 2 * rank * (Din + Dout) per layer
    base = res["capacity"]["base_flops_per_token"]
    assert [r["inference_flops_per_token"] - base for r in rows] == [pytest.approx(L * 2 * r * SIDES)
                                                                      for r in (4, 2, 2, 20)]
    assert [r["adapter_flops_per_token"] for r in rows] == [pytest.approx(L * 2 * r * SIDES) for r in (4, 2, 2, 20)]
    for r in rows:
        entry = res["methods"][r["method"]]
        assert r["ppl"] == entry["mean_ppl"] and r["accuracy"] == entry["mean_accuracy"] and r["ppl"] > 1
        assert (r["routing_accuracy"] is None) == r["method"].startswith("mixed_lora")


def test_ppl_over_its_own_items_and_the_report(study):
    workdir, res = study
    assert res["ppl_items_per_domain"] == [PPL_ITEMS] * len(DOMAIN_NAMES)
    assert res["items_per_domain"] == [1] * len(DOMAIN_NAMES)
    md = open(os.path.join(workdir, "results.md")).read()
    assert "## Capacity: when does MoA beat one LoRA?" in md and f"PPL over {PPL_ITEMS} test items" in md
    table = [line for line in md.splitlines() if line.startswith(("| moa_router", "| mixed_lora"))
             and line.count("|") == 9]
    assert [line.split("|")[1:3] for line in table] == [[" moa_router ", " 4 "], [" moa_router[r2] ", " 2 "],
                                                        [" mixed_lora[r2] ", " 2 "], [" mixed_lora[r20] ", " 20 "]]


def test_ppl_items_are_more_than_the_generation_items(smoke, study):
    """The main arm is the smoke run's MoA (same adapters, same first test item per domain): the same answers and
    routing on the generation item, but PPL over 3 items per domain instead of 1."""
    base, _ = smoke
    _, res = study
    before = json.load(open(os.path.join(base, "results.json")))["methods"]["moa_router"]["per_domain"]
    now = res["methods"]["moa_router"]["per_domain"]
    for d in DOMAIN_NAMES:
        assert now[d]["routing_accuracy"] == before[d]["routing_accuracy"]
        assert now[d]["accuracy"] == before[d]["accuracy"]
    assert any(now[d]["ppl"] != pytest.approx(before[d]["ppl"], rel=1e-4) for d in DOMAIN_NAMES)


def test_main_arm_reused_and_mixed_arms_train_only_the_lora(smoke, study):
    workdir, res = study
    base, _ = smoke
    assert res["stages"]["stage1"] == os.path.join(base, "stage1")
    assert res["stages"]["stage2"] == os.path.join(base, "stage2")
    assert not os.path.exists(os.path.join(workdir, "stage1"))
    arms = os.path.join(workdir, "arms")
    assert sorted(os.listdir(arms)) == ["mixed_r2", "mixed_r20", "moa_r2"]
    assert sorted(os.listdir(os.path.join(arms, "moa_r2"))) == ["stage1", "stage2"]
    for name in ("mixed_r2", "mixed_r20"):
        assert os.listdir(os.path.join(arms, name)) == ["mixed_lora"]
    assert res["capacity"]["arms"]["moa_r2"]["alpha"] == pytest.approx(8.0 * 2 / 4)   # alpha / rank kept


def test_plan():
    job = moa_10task_capacity()
    exp, study = job.exp, job.section
    assert job.workflow == "capacity" and study.rank == 2
    exp = replace(exp, moa=exp.moa.for_domains(DOMAIN_NAMES))   # as prepare() resolves it: one expert per domain
    arms = plan_arms(exp, study)
    assert [(a.label, a.rank, a.exp.moa.alpha) for a in arms] == [
        ("moa_router", 16, 32.0), ("moa_router[r2]", 2, 4.0), ("mixed_lora[r2]", 2, 4.0),
        ("mixed_lora[r20]", 20, 40.0)]
    assert exp.eval.ppl_items_per_domain == 200 and exp.eval.items_per_domain == 20
    # only the main arm may load from reuse_from (the others' stage 1 differs)
    arms = plan_arms(replace(exp, reuse_from="runs/moa_10task"), study)
    assert [a.exp.reuse_from for a in arms] == ["runs/moa_10task", "", "", ""]
    with pytest.raises(ConfigError, match="capacity.rank=-1"):
        resolve_job(smoke_preset(), ["capacity.rank=-1"])
    assert resolve_job(smoke_preset(), ["capacity.rank=3"]).section == CapacityConfig(rank=3)
    with pytest.raises(ConfigError, match="add_domain workflow"):   # a section of a workflow that needs its preset
        resolve_job(smoke_preset(), ["add_domain.base_run=x"])
    with pytest.raises(ConfigError, match="ppl_items_per_domain"):
        EvalConfig(ppl_items_per_domain=-5)
