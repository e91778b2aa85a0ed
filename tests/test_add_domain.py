"""add_domain end to end from a smoke run (tiny random Llama, tiny data), through `python -m experiments.run`:
  - one JSONL domain written on the fly is added: 11 experts, the new one last, trained (non-zero lora_b);
  - the base run's 10 experts are bit-identical in the grown adapters (np.array_equal on every leaf);
  - results.json reports routing accuracy and confusion over all 11 domains, old vs base run, new vs single LoRA,
    and the cost against retraining; results.md has the "Add a domain" section;
  - the router re-fit gives the new domains add_domain.new_share of its batches (counted over the first batches);
  - with moa.route_on=probe the routers' new outputs are then fitted on cached prompts (moa_jax/train/router_fit.py):
    reported, old outputs bit-identical, the new output moved from the re-fit's; without route_on=probe no fit;
  - user mistakes (no/unfinished base run, a name clash, another rank, a bad spec, a bad JSONL line, a share
    outside (0, 1)) are one `error:` line and exit code 2, before any model loads.
"""
import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
from flax import traverse_util

from experiments import run
from moa_jax.workflows.add_domain import refit_source
from moa_jax.config import DataConfig, ExperimentConfig
from moa_jax.data import load_split
from moa_jax.data.tasks import DOMAIN_NAMES
from moa_jax.train.checkpoint import load_adapters
from tests.data_helpers import make_jsonl_dir, tiny_tokenizer


def _run(args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = run.main(args + ["--no_progress"])
    return rc, out.getvalue()


def stage_dir(workdir, stage):
    """A stage's folder as the run's results.json records it (a reused stage stays in the run it came from)."""
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)["stages"][stage]


@pytest.fixture(scope="module")
def runs(smoke, tmp_path_factory):
    """-> (base workdir, add_domain workdir, JSONL path): smoke with 3 methods (its stages reused from the session's
    smoke run), then add_domain from it."""
    root = tmp_path_factory.mktemp("add_domain")
    base, grown = str(root / "smoke"), str(root / "grown")
    rc, _ = _run(["--exp=smoke", f"--workdir={base}", "--set", "eval.items_per_domain=1",
                  "--set", "eval.methods=single_lora,moa_router,moa_oracle", "--set", f"reuse_from={smoke[0]}",
                  "--set", "variants="])
    assert rc == 0
    jsonl = root / "adding.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": f"Add {i} and {i + 3}.", "response": str(2 * i + 3)}) + "\n"
                             for i in range(120)))
    rc, console = _run(["--exp=add_domain", f"--workdir={grown}", "--set", f"add_domain.base_run={base}",
                        "--set", f"add_domain.new_domains=sums=jsonl:{jsonl}", "--set", "stage1.steps=3",
                        "--set", "stage2.steps=2", "--set", "eval.items_per_domain=1",
                        "--set", "add_domain.new_share=0.6"])
    assert rc == 0 and "moa_router[base_run]" in console
    return base, grown, str(jsonl)


def test_old_experts_bit_identical_and_new_expert_trained(runs):
    base, grown, _ = runs
    old = traverse_util.flatten_dict(load_adapters(os.path.join(stage_dir(base, "stage2"), "adapters"))[0])
    new, cfg = load_adapters(os.path.join(grown, "refit", "adapters"))
    new = traverse_util.flatten_dict(new)
    assert cfg["domains"] == list(DOMAIN_NAMES) + ["sums"] and cfg["moa"]["num_experts"] == 11
    experts = [k for k in old if k[-1] in ("lora_a", "lora_b")]
    assert experts and set(old) == set(new)
    for k in experts:
        assert new[k].shape[1] == 11 and new[k].dtype == old[k].dtype
        assert np.array_equal(new[k][:, :10], old[k]), k
    assert any(new[k][:, 10].any() for k in experts if k[-1] == "lora_b"), "the new expert did not train"
    routers = [k for k in old if "router" in k]
    assert all(new[k].shape[-1] == 11 for k in routers)
    # add_domain.refit_routers=new (default): the routers' old outputs stay bit-identical, their new output is re-fitted (the
    # new-expert phase trains no router, so its adapters hold the new output's initial values)
    start = traverse_util.flatten_dict(load_adapters(os.path.join(grown, "new_experts", "adapters"))[0])
    assert all(np.array_equal(new[k][..., :10], old[k]) for k in routers if k[-2] != "hidden")
    assert any(not np.array_equal(new[k][..., 10:], start[k][..., 10:]) for k in routers), "no router re-fit"


def test_report_over_all_domains(runs):
    base, grown, _ = runs
    res = json.load(open(os.path.join(grown, "results.json")))
    assert res["domains"] == list(DOMAIN_NAMES) + ["sums"]
    assert set(res["methods"]) == {"single_lora", "moa_router", "moa_oracle", "moa_router[base_run]"}
    conf = np.asarray(res["methods"]["moa_router"]["confusion"])
    assert conf.shape == (11, 11) and conf.sum() == 11
    assert np.asarray(res["methods"]["moa_router[base_run]"]["confusion"]).shape == (11, 10)
    section = res["add_domain"]
    assert section["old_experts_bit_identical"] is True and section["new_domains"] == ["sums"]
    assert section["new_share"] == 0.6 and res["steps"]["new_share"] == 0.6
    assert section["refit_routers"] == "new" == res["steps"]["refit_routers"]
    assert section["routing_accuracy"] == pytest.approx(np.trace(conf) / 11)
    assert set(section["old_vs_base_run"]) == set(DOMAIN_NAMES)
    assert set(section["new_vs_single_lora"]["sums"]) == {"single_lora", "moa_oracle", "moa_router"}
    cost = section["cost"]
    assert cost["add_domain"]["total"]["steps"] == 5 and cost["retrain_estimate"]["steps"] == 3 + 3
    assert cost["add_domain"]["total"]["seconds"] > 0 and cost["retrain_estimate"]["seconds"] > 0
    # the base run's MoA on an old domain: same experts and items, so the oracle PPL is the base run's own
    base_res = json.load(open(os.path.join(base, "results.json")))
    for d in DOMAIN_NAMES:
        assert res["methods"]["moa_oracle"]["per_domain"][d]["ppl"] == pytest.approx(
            base_res["methods"]["moa_oracle"]["per_domain"][d]["ppl"], rel=1e-5), d
    md = open(os.path.join(grown, "results.md")).read()
    assert "## Add a domain" in md and "retrain stage 1 + stage 2 (estimate)" in md and "| sums |" in md


def test_router_fit_with_routers_on_the_base_model(runs, tmp_path):
    base, grown, jsonl = runs
    fitted = str(tmp_path / "fitted")
    rc, _ = _run(["--exp=add_domain", f"--workdir={fitted}", "--set", f"add_domain.base_run={base}",
                  "--set", f"add_domain.new_domains=sums=jsonl:{jsonl}", "--set", "stage1.steps=3", "--set", "stage2.steps=2",
                  "--set", "eval.items_per_domain=1", "--set", "eval.methods=moa_router",
                  "--set", "moa.route_on=probe", "--set", "add_domain.router_prompts=4"])
    assert rc == 0
    stats = json.load(open(os.path.join(fitted, "results.json")))["add_domain"]["router_fit"]
    assert stats["examples"] == 11 * 4 and stats["prompts_per_domain"] == 4
    assert stats["objective_after"] < stats["objective_before"]
    assert json.load(open(os.path.join(grown, "results.json")))["add_domain"]["router_fit"] is None   # adapted
    old = traverse_util.flatten_dict(load_adapters(os.path.join(stage_dir(base, "stage2"), "adapters"))[0])
    new = traverse_util.flatten_dict(load_adapters(os.path.join(fitted, "refit", "adapters"))[0])
    kernels = [k for k in old if "router" in k and k[-2] != "hidden"]
    assert kernels and all(np.array_equal(new[k][..., :10], old[k]) for k in kernels)
    # refit/adapters hold the fitted routers (what was evaluated), not the SGD re-fit's last step
    assert load_adapters(os.path.join(fitted, "refit", "adapters"))[1]["router_fit"] == stats
    assert ("The routers' new outputs fitted after the SGD steps on 44 cached training prompts (4 per domain; "
            "add_domain.router_prompts)") in open(os.path.join(fitted, "results.md")).read()


@pytest.mark.parametrize("share", [0.5, 0.25])
def test_refit_batches_hold_the_new_share(tmp_path, share):
    """Old domains alpha (30 examples) and beta (12), new domain gamma (6): over the first 40 re-fit batches of 8,
    gamma fills `share` of the rows and alpha and beta split the rest equally (uniform mixing), whatever their
    sizes; uniform mixing over all three would give gamma 1/3."""
    root = make_jsonl_dir(tmp_path, n_per_domain=(30, 12, 6))
    exp = ExperimentConfig(data=DataConfig(source=f"jsonl:{root}", holdout_fraction=0.0, max_len=128,
                                           buckets=(32, 64, 128), batch_size=8))
    train = load_split(exp.data, tiny_tokenizer(vocab_size=300), "train")
    assert train.domains == ("alpha", "beta", "gamma")
    source = refit_source(exp, train, n_old=2, new_share=share)
    domains = np.concatenate([source.batch(s)["domain"] for s in range(40)])
    counts = np.bincount(domains, minlength=3) / len(domains)
    assert counts[2] == pytest.approx(share, abs=0.02)
    assert counts[0] == pytest.approx((1 - share) / 2, abs=0.02) and counts[1] == pytest.approx((1 - share) / 2,
                                                                                                  abs=0.02)
    assert all(b["domain"].shape == (8,) for b in map(source.batch, range(3)))


def _error(capsys, args) -> str:
    rc, _ = _run(["--exp=add_domain"] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) <= 2 and "Traceback" not in err, err
    return err


def test_user_errors(runs, tmp_path, capsys):
    base, _, jsonl = runs
    out = f"--workdir={tmp_path / 'out'}"
    assert "--set add_domain.base_run=DIR" in _error(capsys, [out, "--set", "add_domain.new_domains=basic_arithmetic"])
    assert "no such directory" in _error(capsys, [out, "--set", f"add_domain.base_run={tmp_path}/nope",
                                                  "--set", "add_domain.new_domains=basic_arithmetic"])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(os.path.join(base, "config.json"), unfinished)
    assert "unfinished" in _error(capsys, [out, "--set", f"add_domain.base_run={unfinished}",
                                           "--set", "add_domain.new_domains=basic_arithmetic"])
    good = [out, "--set", f"add_domain.base_run={base}"]
    assert "already exist" in _error(capsys, good + ["--set", "add_domain.new_domains=chain_sum"])
    assert "moa.rank=4, not 8" in _error(capsys, good + ["--set", "add_domain.new_domains=basic_arithmetic",
                                                         "--set", "moa.rank=8"])
    assert "model='tiny-random'" in _error(capsys, good + ["--set", "add_domain.new_domains=basic_arithmetic",
                                                           "--set", "model=smollm2-135m-instruct"])
    assert "reasoning-gym generator" in _error(capsys, good + ["--set", "add_domain.new_domains=not_a_generator"])
    for share in ("0", "1.5", "-0.2"):
        assert f"add_domain.new_share={float(share)}" in _error(capsys, good + ["--set", "add_domain.new_domains=basic_arithmetic",
                                                                            "--set", f"add_domain.new_share={share}"])
    assert "is not a file" in _error(capsys, good + ["--set", f"add_domain.new_domains=jsonl:{tmp_path}/none.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(jsonl).readline() + '{"prompt": "x"}\n')
    assert f"{bad}:2: missing field 'response'" in _error(capsys, good + ["--set", f"add_domain.new_domains=jsonl:{bad}"])
