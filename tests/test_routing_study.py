"""The routing study on the session's smoke run (moa_jax/eval/calibration.py), without training again:
  - `--set reuse_from=SMOKE` with the AUTO settings re-uses stage 1 and stage 2 and settles the policy on validation
    (exit layer by the rule, fitted temperature, the coverage threshold); results.json's "Routing" section,
    routing.json, results.md, load_run(...).moa and an export's router.json all carry the same policy;
  - the exported reference_router.py, in a process where jax cannot be imported, makes moa_jax's decision on the
    smoke test prompts with an early exit, a temperature and an abstention threshold (None = the base model).
"""
import contextlib
import dataclasses
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax.data.tasks import DOMAIN_NAMES
from tests.no_jax_router import route_without_jax


@pytest.fixture(scope="module")
def auto_run(smoke, tmp_path_factory):
    from experiments import run
    workdir = str(tmp_path_factory.mktemp("routing_auto"))
    with contextlib.redirect_stdout(io.StringIO()):
        rc = run.main(["--exp=smoke", f"--workdir={workdir}", "--no_progress", "--set", "eval.items_per_domain=1",
                       "--set", "eval.methods=moa_router", "--set", "variants=", "--set", f"reuse_from={smoke[0]}",
                       "--set", "moa.exit_layer=-1", "--set", "moa.temperature=-1", "--set", "moa.abstain_below=-1"])
    assert rc == 0
    return workdir, smoke[0]


def test_auto_policy_is_settled_on_validation_and_recorded(auto_run, tmp_path):
    import moa_jax
    from moa_jax.eval import calibration
    workdir, smoke_dir = auto_run
    res = json.load(open(os.path.join(workdir, "results.json")))
    assert res["stages"]["stage2"] == os.path.join(smoke_dir, "stage2")       # reused, not trained again
    study = res["routing"]
    rows = study["by_exit_layer"]
    assert [r["k"] for r in rows] == [1, 2]
    rule_k = calibration.pick_exit_layer([r["validation_accuracy"] for r in rows], 0.5)
    assert study["exit_rule"]["exit_layer"] == study["exit_rule"]["rule_k"] == rule_k
    assert study["calibration"]["temperature"] == study["calibration"]["fitted_temperature"] > 0
    cal = study["calibration"]
    assert cal["validation_nll"]["after"] <= cal["validation_nll"]["before"]
    ab = study["abstention"]
    assert ab["threshold"] == ab["rule_threshold"] and ab["at_threshold"]["validation"]["coverage"] >= 0.98
    assert set(study["prompts"]["out_of_domain"]) == {"basic_arithmetic", "caesar_cipher", "gcd", "count_bits",
                                                        "chat"}
    assert all(r["share_of_prefill"] > 0 for r in rows)
    for r in rows:    # a layer that routes every validation prompt right misses no domain, and vice versa
        assert (r["validation_accuracy"] == 1.0) == (r["validation_missed"] == {})
        assert set(r["validation_missed"]) <= set(DOMAIN_NAMES)
    policy = json.load(open(os.path.join(workdir, "routing.json")))["policy"]
    assert policy == study["policy"] and policy["exit_layer"] == rule_k
    assert policy["temperature"] == cal["temperature"] and policy["abstain_below"] == ab["threshold"]
    md = open(os.path.join(workdir, "results.md")).read()
    assert "## Routing" in md and f"exit after layer {rule_k}" in md
    # the threshold in use is the rule's here, so both abstention rows agree, out-of-domain rates included
    rule_at = ab["at_rule_threshold"]
    assert rule_at["out_of_domain_abstained"] == ab["out_of_domain_abstained"]
    assert rule_at["out_of_domain_by_source"] == ab["out_of_domain_by_source"]
    assert f"| the rule's | {ab['rule_threshold']:.3f} | {rule_at['validation']['coverage']:.3f} |" in md
    # the run's model routes with that policy, and its export records it
    model = moa_jax.load_run(workdir)
    assert (model.moa.exit_layer, model.moa.temperature, model.moa.abstain_below) == (
        rule_k, policy["temperature"], policy["abstain_below"])
    out = str(tmp_path / "export")
    model.export_peft(out)
    spec = json.load(open(os.path.join(out, "router.json")))["routing_policy"]
    assert (spec["exit_layer"], spec["temperature"], spec["abstain_below"], spec["fallback"]) == (
        rule_k, policy["temperature"], policy["abstain_below"], "base")


def test_reference_router_makes_the_early_exit_and_abstain_decision(smoke, tmp_path):
    from moa_jax.data.pipeline import load_split
    from moa_jax.eval import calibration
    from moa_jax.export import export_merged, export_peft
    from moa_jax.generate.decode import left_pad, route_from_prompt
    from moa_jax.loading.base import load_base_model
    from moa_jax.params import init_trainable, merge_params
    from moa_jax.run_artifacts import training_system_prompt
    from tests.test_reference_router import _stage
    from experiments.registry import get_experiment
    trainable, cfg, moa = _stage(smoke[0], "stage2")
    _, frozen, tokenizer = load_base_model("tiny-random", "float32")
    split = load_split(get_experiment("smoke").data, tokenizer, "test")
    rows = [int(r) for d in range(len(DOMAIN_NAMES)) for r in np.flatnonzero(split.domain == d)[:4]]
    prompts = [split.tokens(r)[:split.prompt_len[r]].tolist() for r in rows]
    tokens, mask = left_pad(prompts, split.pad_id)
    params = merge_params(jax.tree_util.tree_map(jnp.asarray, frozen), jax.tree_util.tree_map(jnp.asarray, trainable))
    # the trained routers read on the base model (servable), deciding after layer 1, at T = 0.5
    servable = dataclasses.replace(moa, route_on="probe", exit_layer=1, temperature=0.5)
    _, logits = route_from_prompt(cfg, servable, params, jnp.asarray(tokens), jnp.asarray(mask))
    conf = calibration.confidence(np.asarray(logits), "last", 0.5)
    policy = dataclasses.replace(servable, abstain_below=float(np.median(conf)))
    idx, _ = route_from_prompt(cfg, policy, params, jnp.asarray(tokens), jnp.asarray(mask), names=DOMAIN_NAMES)
    ours = np.asarray(idx)
    assert 0 < (ours == -1).sum() < len(rows) and len(set(ours[ours >= 0].tolist())) > 1   # the check can fail

    system = training_system_prompt(json.load(open(os.path.join(smoke[0], "config.json")))["data"])
    out, base_dir = str(tmp_path / "export"), str(tmp_path / "base")
    export_peft(trainable, cfg, policy, out, expert_names=list(DOMAIN_NAMES), base_model="tiny-random",
                tokenizer=tokenizer, system_prompt=system)
    export_merged(merge_params(frozen, init_trainable(cfg, moa, jax.random.PRNGKey(0))), cfg, moa, 0, base_dir,
                  tokenizer=tokenizer)
    theirs = route_without_jax(out, base_dir, prompts, str(tmp_path))
    assert np.asarray(theirs[0]["logits"]).shape == (1, moa.num_experts)     # router 1 only
    np.testing.assert_allclose(np.asarray([r["logits"] for r in theirs])[:, 0], np.asarray(logits)[0], atol=1e-4)
    assert [r["expert"] for r in theirs] == [None if e < 0 else DOMAIN_NAMES[e] for e in ours]


def test_missed_domains_are_the_imperfect_ones_worst_first():
    from moa_jax.eval import calibration
    labels = np.asarray([0, 0, 1, 1, 2, 2])
    chosen = np.asarray([0, 0, 1, 2, 0, 1])          # domain 1 half right, domain 2 never
    logits = np.eye(3)[chosen][None]                 # (k=1, N, E): router 1 votes for `chosen`
    assert calibration.missed_domains(logits, labels, "last", ["a", "b", "c"]) == {"c": 0.0, "b": 0.5}
    perfect = np.eye(3)[labels][None]
    assert calibration.missed_domains(perfect, labels, "last", ["a", "b", "c"]) == {}


def test_a_runs_study_times_a_spread_of_exit_layers_and_the_rules_neighbours():
    from moa_jax.eval import calibration
    assert calibration.timed_layers(30, 27) == [1, 5, 9, 13, 18, 22, 26, 27, 28, 30]
    assert calibration.timed_layers(30, 1) == [1, 2, 5, 9, 13, 18, 22, 26, 30]
    assert calibration.timed_layers(2, 1) == [1, 2]                   # few layers: every one


def test_out_of_domain_generators_skip_the_runs_own_domains():
    """Four reasoning-gym sources that are not domains of the run, plus the chat prompts: a run over the wide
    registry (which holds the first four) is measured on the next four, not on chat prompts alone."""
    from moa_jax.data.tasks import WIDE_DOMAIN_NAMES as wide
    from moa_jax.eval import calibration
    from tests.data_helpers import tiny_tokenizer
    tok = tiny_tokenizer()
    ten = calibration.ood_prompts(tok, None, "plain", DOMAIN_NAMES)
    assert list(ten) == list(calibration.OOD_GENERATORS[:4]) + ["chat"]
    assert set(calibration.OOD_GENERATORS[:4]) <= set(wide)
    many = calibration.ood_prompts(tok, None, "plain", wide)
    assert list(many) == list(calibration.OOD_GENERATORS[4:8]) + ["chat"] and not set(many) & set(wide)
    assert all(len(p) == calibration.OOD_PER_GENERATOR for s, p in many.items() if s != "chat")
    assert all(len(t) > 0 for group in many.values() for t in group)
