"""Servable routing end to end on the smoke experiment (its `servable` variant: moa.route_on=probe, its own stage 2):
  - the report lists the routing accuracy of both policies (adapted routing pass, plain base forward);
  - export_peft writes router.json (route_on, hidden state, pooling, decision, chat template, system prompt, base
    model), the training tokenizer and reference_router.py;
  - the exported reference_router.py, run in a process where jax and flax cannot be imported, on the base model
    saved as a transformers checkpoint, formats every test prompt of the smoke data exactly as training did and
    picks the same expert as moa_jax for every one of them (router logits equal to 1e-4);
  - the report's routing of the servable variant is what the reference router picks;
  - the paper's routers (route_on=adapted) are exported with servable: false and the reference router refuses them.
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

from experiments.registry import SERVABLE, get_experiment
from moa_jax.data.tasks import DOMAIN_NAMES
from tests.no_jax_router import route_without_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_run(smoke, tmp_path_factory):
    """The smoke preset with its servable variant, stage 1 and stage 2 reused from the session's smoke run."""
    from experiments import run
    assert SERVABLE in get_experiment("smoke").variants
    workdir = str(tmp_path_factory.mktemp("servable"))
    with contextlib.redirect_stdout(io.StringIO()):
        rc = run.main(["--exp=smoke", f"--workdir={workdir}", "--no_progress", "--set", "eval.items_per_domain=1",
                       "--set", "eval.methods=moa_router", "--set", f"reuse_from={smoke[0]}"])
    assert rc == 0
    return workdir


def _stage(workdir, stage):
    from moa_jax.config import ModelConfig, MoAConfig
    from moa_jax.train.checkpoint import load_adapters
    with open(os.path.join(workdir, "results.json")) as f:   # a reused stage stays in the run it came from
        folder = json.load(f)["stages"][stage]
    trainable, saved = load_adapters(os.path.join(folder, "adapters"))
    cfg = ModelConfig(**{k: v for k, v in saved["model"].items() if k != "source"})
    return trainable, cfg, MoAConfig(**saved["moa"])


def test_report_lists_routing_accuracy_per_policy(smoke_run):
    res = json.load(open(os.path.join(smoke_run, "results.json")))
    assert set(res["methods"]) == {"moa_router", "moa_router[servable]"}
    assert res["methods"]["moa_router"]["routing_policy"] == {"route_on": "adapted", "decision": "last"}
    assert res["methods"]["moa_router[servable]"]["routing_policy"] == {"route_on": "probe", "decision": "last"}
    md = open(os.path.join(smoke_run, "results.md")).read()
    table = md.split("### Routing accuracy by routing policy")[1]
    for method in ("moa_router", "moa_router[servable]"):
        acc = res["methods"][method]["mean_routing_accuracy"]
        assert f"| {method} |" in table and f"| {acc:.3f} |" in table
    assert "one forward of the plain base model (servable)" in table
    assert "the adapted routing pass" in table


def test_reference_router_picks_moa_jax_expert_on_every_test_prompt(smoke_run, tmp_path):
    from moa_jax.data.pipeline import load_split
    from moa_jax.export import export_merged, export_peft
    from moa_jax.generate.decode import left_pad, route_from_prompt
    from moa_jax.loading.base import load_base_model
    from moa_jax.params import init_trainable, merge_params
    from moa_jax.run_artifacts import training_system_prompt
    exp = get_experiment("smoke")
    trainable, cfg, moa = _stage(smoke_run, "variants/servable/stage2")
    assert moa.route_on == "probe"
    _, frozen, tokenizer = load_base_model("tiny-random", "float32")
    system = training_system_prompt(json.load(open(os.path.join(smoke_run, "config.json")))["data"])
    out = str(tmp_path / "export")
    export_peft(trainable, cfg, moa, out, expert_names=list(DOMAIN_NAMES), base_model="tiny-random",
                tokenizer=tokenizer, system_prompt=system)
    spec = json.load(open(os.path.join(out, "router.json")))
    assert spec["servable"] and spec["route_on"] == "probe" and spec["experts"] == list(DOMAIN_NAMES)
    assert spec["prompt"]["system_prompt"] == system and spec["prompt"]["chat_template"] == tokenizer.chat_template
    assert spec["hidden_state"]["router_l_reads"] == "hidden_states[l]" and spec["decision"] == "last"
    assert spec["router"]["tensors"] == {"kernel": [cfg.num_layers, cfg.hidden_size, moa.num_experts]}
    with open(os.path.join(out, "reference_router.py"), "rb") as a, \
            open(os.path.join(ROOT, "moa_jax", "reference_router.py"), "rb") as b:
        assert a.read() == b.read()
    # the base model as a plain transformers checkpoint (zero adapters merged = the base weights)
    base_dir = str(tmp_path / "base")
    zero = merge_params(frozen, init_trainable(cfg, moa, jax.random.PRNGKey(0)))
    export_merged(zero, cfg, moa, 0, base_dir, tokenizer=tokenizer)

    split = load_split(exp.data, tokenizer, "test")
    rows = list(range(len(split)))
    prompts = [split.tokens(r)[:split.prompt_len[r]].tolist() for r in rows]
    messages = [split.example(r)["messages"] for r in rows]
    tokens, mask = left_pad(prompts, split.pad_id)
    params = merge_params(jax.tree_util.tree_map(jnp.asarray, frozen), jax.tree_util.tree_map(jnp.asarray, trainable))
    idx, logits = route_from_prompt(cfg, moa, params, jnp.asarray(tokens), jnp.asarray(mask))
    ours, ours_logits = np.asarray(idx), np.asarray(logits)                                    # (N,), (L, N, E)

    theirs = route_without_jax(out, base_dir, messages, str(tmp_path))
    assert len(theirs) == len(rows) == 160
    for i, row in enumerate(theirs):
        assert row["ids"] == prompts[i], i                  # chat template + system prompt recorded exactly
    diff = np.max(np.abs(np.asarray([r["logits"] for r in theirs]) - ours_logits.transpose(1, 0, 2)))
    assert diff < 1e-4, diff
    assert [r["expert"] for r in theirs] == [DOMAIN_NAMES[e] for e in ours]
    assert len(set(ours.tolist())) > 1        # the routers differ between prompts: the check could fail

    # the report's routing of the servable variant (first test item of each domain) is the reference router's
    conf = np.asarray(json.load(open(os.path.join(smoke_run, "results.json")))
                      ["methods"]["moa_router[servable]"]["confusion"])
    firsts = [int(np.flatnonzero(split.domain == d)[0]) for d in range(len(DOMAIN_NAMES))]
    expected = np.zeros_like(conf)
    for d, r in enumerate(firsts):
        expected[d, DOMAIN_NAMES.index(theirs[r]["expert"])] += 1
    assert (conf == expected).all()


def test_adapted_routers_export_as_not_servable(smoke_run, tmp_path):
    from moa_jax import reference_router
    from moa_jax.export import export_peft
    trainable, cfg, moa = _stage(smoke_run, "stage2")
    assert moa.route_on == "adapted"
    out = str(tmp_path / "export")
    export_peft(trainable, cfg, moa, out, expert_names=list(DOMAIN_NAMES), base_model="smollm2-135m-instruct")
    spec = json.load(open(os.path.join(out, "router.json")))
    assert spec["servable"] is False and "NOT servable" in spec["note"]
    assert spec["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "Q4_1" in spec["base_weights"]
    assert not os.path.exists(os.path.join(out, "reference_router.py"))
    with pytest.raises(reference_router.RouterNotServableError, match=r"route_on='adapted'"):
        reference_router.load(out)
    servable = dataclasses.replace(moa, route_on="probe")
    with pytest.raises(ValueError, match=r"pass tokenizer= .* and system_prompt="):
        export_peft(trainable, cfg, servable, str(tmp_path / "x"))


def test_router_refit_fits_every_router_output_and_nothing_else(smoke_run, tmp_path, capsys):
    """benchmarks/studies/router_refit.py on the servable variant: every router output fitted on cached train
    prompts (the objective falls), the experts bit-identical, the routing study of both router sets recorded; a
    stage that routes on the adapted pass is refused (exit 2)."""
    from flax import traverse_util
    from benchmarks.studies import router_refit
    from moa_jax.run_artifacts import stage_adapters
    from moa_jax.train.checkpoint import load_adapters
    stage, out = "variants/servable/stage2", tmp_path / "refit"
    assert router_refit.main(["--workdir", smoke_run, "--stage", stage, "--prompts-per-domain", "3",
                              "--out", str(out)]) == 0
    res = json.load(open(out / "router_refit.json"))
    assert res["fit"]["examples"] == 3 * len(DOMAIN_NAMES)
    assert res["fit"]["objective_after"] < res["fit"]["objective_before"]
    for name in ("sgd", "fitted"):
        assert [r["k"] for r in res["studies"][name]["by_exit_layer"]] == [1, 2]
    sgd = traverse_util.flatten_dict(load_adapters(stage_adapters(smoke_run, stage))[0])
    fitted = traverse_util.flatten_dict(load_adapters(str(out / "adapters"))[0])
    assert sgd.keys() == fitted.keys()
    routers = [k for k in sgd if "router" in k]
    assert routers and all(not np.array_equal(sgd[k], fitted[k]) for k in routers)
    assert all(np.array_equal(sgd[k], fitted[k]) for k in sgd if "router" not in k)
    assert "| 2 |" in (out / "router_refit.md").read_text()
    capsys.readouterr()
    assert router_refit.main(["--workdir", smoke_run, "--out", str(tmp_path / "adapted")]) == 2
    assert "route_on='adapted'" in capsys.readouterr().err
