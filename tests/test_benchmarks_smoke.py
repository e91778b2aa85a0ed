"""CI smoke of the benchmark suite: tiny shapes, 2 interleaved rounds, guards that hold on any CPU.

A dense loop over experts instead of top-1 dispatch shows in the compiled program: XLA's FLOP count of top-1 E=32
(or E=10) over E=1 stays under 1.5 (it is ~1.02: only the router and AdamW over more experts; a dense loop adds
the LoRA work of every expert, ~2.3x at E=32). A recompile per step shows as a compile during the timed rounds.
Time itself is guarded only against a several-fold slowdown (ratio < 3): 2 rounds on a busy shared CPU have given
1.52 where the FLOPs are equal, and no wall-clock budget is asserted. The real speed targets are measured by
`python -m benchmarks.run --suite cpu`.
"""
import json

import pytest

from benchmarks import report, run


def test_smoke_suite_runs_and_guards_hold(tmp_path):
    out = tmp_path / "smoke.json"
    result = run.main(["--suite", "smoke", "--out", str(out)])

    g = result["groups"]["train"]
    assert g["compiles_in_steady_state"] == 0, g["compiled_names"]
    flops = {name: v["flops_xla"] for name, v in g["variants"].items()}
    assert flops["top1_E10"] / flops["top1_E1"] < 1.5 and flops["top1_E32"] / flops["top1_E1"] < 1.5, flops
    rows = {(r["num"], r["den"]): r["value"] for r in g["ratios"]}
    assert rows[("top1_E10", "top1_E1")] < 3, rows
    assert rows[("top1_E32", "top1_E1")] < 3, rows
    for v in g["variants"].values():
        assert v["rounds"] == 2 and v["min_s"] > 0 and v["compile_s"] > 0
        assert v["flops_analytic"] > 0 and v["memory"]["temp_size"] is not None

    saved = json.loads(out.read_text())
    assert saved["machine"]["cores"] >= 1 and saved["machine"]["versions"]["jax"]
    md = (tmp_path / "smoke.md").read_text()
    assert "| train |" in md and md == report.markdown(result)


def test_replay_expert_trains_one_expert_on_exactly_its_domains_rows(tmp_path):
    import numpy as np
    from benchmarks.studies import replay_expert
    from experiments.registry import get_experiment
    from moa_jax.data.pipeline import TrainBatches, load_split
    from moa_jax.loading.base import load_base_model

    out = tmp_path / "replay.jsonl"
    replay_expert.main(["--exp", "smoke", "--domain", "chain_sum", "--steps", "3", "--out", str(out), "--probe"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    probe = rows.pop()
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the probe of batch 4: smoke computes in float32 without dropout, so all three losses agree, and the loss is
    # the mean of the per-token NLLs it lists for batch 4 (one domain: the domain mean)
    assert probe["probe_step"] == 4 and set(probe["tokens"]) == {"batch 3", "batch 4"}
    losses = [v["loss"] for v in probe["loss"].values()]
    assert len(losses) == 3 and max(losses) - min(losses) < 1e-4
    nlls = [t["nll"] for t in probe["tokens"]["batch 4"]]
    assert nlls and abs(np.mean(nlls) - probe["loss"]["float32"]["loss"]) < 2e-3
    assert all(len(t["top"]) == 3 for t in probe["tokens"]["batch 3"])
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)

    exp = get_experiment("smoke")   # the rows each step saw = chain_sum's rows of the experiment's global batch
    data = load_split(exp.data, load_base_model(exp.model, "float32")[2], "train")
    batches = TrainBatches(data, exp.data)
    d = data.domains.index("chain_sum")
    expected = [int((data.domain[np.asarray(batches.rows[s])] == d).sum()) for s in range(3)]
    assert [r["rows"] for r in rows] == expected


def test_replay_expert_probes_the_first_batch_before_any_update(tmp_path):
    from benchmarks.studies import replay_expert

    out = tmp_path / "replay.jsonl"
    replay_expert.main(["--exp", "smoke", "--domain", "chain_sum", "--steps", "0", "--out", str(out), "--probe"])
    (probe,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert probe["probe_step"] == 1 and set(probe["tokens"]) == {"batch 1"} and probe["tokens"]["batch 1"]
    with pytest.raises(SystemExit):
        replay_expert.main(["--exp", "smoke", "--steps", "-1"])


def test_replay_curves_compares_runs_over_their_common_steps(tmp_path, capsys):
    from benchmarks.studies import replay_curves

    def write(name, losses, grads, probe=False):
        path = tmp_path / name
        lines = [json.dumps({"step": i + 1, "loss": x, "grad_norm": g, "rows": 3})
                 for i, (x, g) in enumerate(zip(losses, grads))]
        path.write_text("\n".join(lines + ([json.dumps({"probe_step": len(losses) + 1})] if probe else [])) + "\n")
        return str(path)

    a = write("a.jsonl", [1.0, 3.0, 0.5, 0.5, 9.0], [1.0, 2.0, 50.0, 1.0, 7.0], probe=True)
    b = write("b.jsonl", [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    png = tmp_path / "curves.png"
    replay_curves.main([f"spiky={a}", f"calm={b}", "--window", "2", "--after", "1", "--png", str(png)])
    out = capsys.readouterr().out
    assert "Steps 1-4, windows of 2" in out                      # the common steps: b's 4, not a's 5
    assert "| 1-2 | 2.000 / 3.00 / 2.0 | 1.000 / 1.00 / 1.0 |" in out
    assert "| 3-4 | 0.500 / 0.50 / 50.0 | 1.000 / 1.00 / 1.0 |" in out
    assert "| spiky | 2: 3.00 | 50.0 (step 3) |" in out           # step 5's 9.0 is past the common steps
    assert "| calm | none | 1.0 (step 2) |" in out
    assert png.stat().st_size > 10_000
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 1, "grad_norm": 1}\nnot json\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: not a JSON line"):
        replay_curves.main([str(bad)])
