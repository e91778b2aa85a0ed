"""End to end on the smoke experiment (the session's `smoke` run, tests/conftest.py: random tiny Llama, tiny data,
2+2 steps, 1 test item per domain, through the experiment runner's own entry point, one ablation variant eta = 0):
  - the report files: results.md, results.json, the three PNG figures (non-trivial images);
  - every method x domain has every metric; the router's confusion matrix; the variant's own stage-2 run;
  - the generate CLI on that work directory prints an expert (with its domain) and an answer;
  - the CLI formats prompts exactly as training did (chat template + the run's system prompt);
  - reuse_from: matching stage adapters are taken, a different stage-1 config is refused naming the field;
  - TensorBoard: each stage's LM loss and learning rate per logged step, the evaluation's averages per method.
"""
import glob
import json
import os
import struct

import numpy as np
import pytest

from moa_jax.data.tasks import DOMAIN_NAMES

METHODS = ["most_common", "base", "single_lora", "mixed_lora", "moa_router", "moa_oracle", "moa_router[eta0]"]


def test_smoke_writes_the_report(smoke):
    workdir, console = smoke
    for name in ("results.md", "results.json", "config.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 500, name
    import matplotlib.image
    for name in ("accuracy_by_method.png", "router_confusion.png", "training_curves.png"):
        path = os.path.join(workdir, name)
        assert os.path.getsize(path) > 20_000, name
        img = matplotlib.image.imread(path)
        assert img.shape[0] > 300 and img.shape[1] > 600, (name, img.shape)
        grey = img[::3, ::3, :3].mean(axis=-1)
        assert len(np.unique(np.round(grey, 2))) > 20 and (grey < 0.5).mean() > 0.002, f"{name} is (nearly) blank"
    md = open(os.path.join(workdir, "results.md")).read()
    for text in ("## Averages over domains", "## Where MoA (moa_router) does not beat another method",
                 "MoA vs single_lora (accuracy):", "MoA vs mixed_lora (accuracy):", "## BLEU-4 per domain",
                 "## ROUGE-L per domain", "## PPL per domain", "### Confusion matrix of `moa_router`",
                 "- `eta0`: `stage2.eta=0`", "![router confusion](router_confusion.png)",
                 "## Data: examples per domain and split", "| chain_sum | 64 of 64 | 16 of 16 | 16 of 16 | 1 |"):
        assert text in md, text
    assert "moa_router[eta0]" in console and "report: " in console and "MoA vs base (accuracy)" in console


def test_smoke_results_are_complete(smoke):
    workdir, _ = smoke
    res = json.load(open(os.path.join(workdir, "results.json")))
    assert res["domains"] == list(DOMAIN_NAMES) and res["items_per_domain"] == [1] * 10
    assert list(res["methods"]) == METHODS
    for name, entry in res["methods"].items():
        assert set(entry["per_domain"]) == set(DOMAIN_NAMES), name
        for d, row in entry["per_domain"].items():
            for metric in ("accuracy", "bleu", "rouge_l", "corpus_bleu", "ppl"):
                assert metric in row, (name, d, metric)
            assert 0 <= row["accuracy"] <= 1 and 0 <= row["bleu"] <= 100 and 0 <= row["rouge_l"] <= 100
            assert (row["ppl"] is None) == (name == "most_common")
    for name in ("moa_router", "moa_router[eta0]"):
        conf = np.asarray(res["methods"][name]["confusion"])
        assert conf.shape == (10, 10) and conf.sum() == 10 and (conf.sum(axis=1) == 1).all()
        assert res["methods"][name]["mean_routing_accuracy"] == pytest.approx(np.trace(conf) / 10)
    assert set(res["methods"]["most_common"]["answers"]) == set(DOMAIN_NAMES)
    # what the max-length policy did per split and domain, and the test items evaluated (tiny: 16 per split)
    assert set(res["data"]["splits"]) == {"train", "validation", "test"} and res["data"]["length_policy"] == "drop"
    assert res["data"]["splits"]["test"]["chain_sum"]["total"] == 16
    assert res["data"]["evaluated"] == {d: 1 for d in DOMAIN_NAMES}
    # moa_oracle reruns only the items the router sent to another expert (the rest is shared with moa_router)
    routed_right = int(np.trace(np.asarray(res["methods"]["moa_router"]["confusion"])))
    assert res["methods"]["moa_router"]["items_computed"] == 10
    assert res["methods"]["moa_oracle"]["items_computed"] == 10 - routed_right
    assert res["methods"]["moa_router[eta0]"]["items_computed"] == 10      # its own adapters: nothing shared
    # the variant trained its own stage 2 from the shared stage 1, in its own sub-directory
    assert set(res["stages"]) == {"stage1", "stage2", "mixed_lora", "variants/eta0/stage2"}
    variant_dir = os.path.join(workdir, "variants", "eta0", "stage2")
    assert os.path.isdir(os.path.join(variant_dir, "adapters"))
    assert json.load(open(os.path.join(variant_dir, "adapters", "config.json")))["train"]["eta"] == 0.0
    assert not os.path.exists(os.path.join(workdir, "variants", "eta0", "stage1"))


def _tb_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of `directory`: tag -> [(step, value)], read from the TFRecord
    framing (u64 length, u32 crc, Event proto, u32 crc) with tensorboardX's own protos."""
    from tensorboardX.proto.event_pb2 import Event
    out: dict = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        data, pos = open(path, "rb").read(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_has_losses_learning_rates_and_evaluation(smoke):
    """Training scalars are `train/<metrics.jsonl key>` (validation's `eval/<key>` keys are their own tags), the
    evaluation's `eval/<metric>/<method>`."""
    from moa_jax.train.metrics_log import EVAL_METRICS, eval_tag, train_tag
    workdir, _ = smoke
    res = json.load(open(os.path.join(workdir, "results.json")))
    for stage, router in (("stage1", False), ("stage2", True)):
        tb = _tb_scalars(os.path.join(workdir, stage, "tensorboard"))
        rows = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]
        assert [r["step"] for r in rows] == [1, 2]
        assert set(tb) == {train_tag(key) for r in rows for key in r if key != "step"}, (stage, sorted(tb))
        assert train_tag("lm_loss") == "train/lm_loss" and train_tag("eval/lm_loss") == "eval/lm_loss"
        for key in ("loss", "lm_loss", "learning_rate", f"loss/{DOMAIN_NAMES[0]}") + (
                ("router_acc", "learning_rate_router") if router else ()):
            assert tb[f"train/{key}"] == [(r["step"], pytest.approx(r[key])) for r in rows], (stage, key)
        assert ("train/learning_rate_router" in tb) == router
    eval_tb = _tb_scalars(os.path.join(workdir, "eval", "tensorboard"))
    final = res["steps"]["stage2"]
    for method, entry in res["methods"].items():
        assert eval_tb[eval_tag("accuracy", method)] == [(final, pytest.approx(entry["mean_accuracy"]))]
        assert (eval_tag("ppl", method) in eval_tb) == (method != "most_common")
        assert (eval_tag("routing_accuracy", method) in eval_tb) == method.startswith("moa_router")
    assert eval_tag("accuracy", "moa_router") == "eval/accuracy/moa_router"
    assert eval_tag("bleu", "moa_router[eta0]") == "eval/bleu/moa_router.eta0"
    assert len(eval_tb) == sum(e[f"mean_{m}"] is not None for e in res["methods"].values() for m in EVAL_METRICS)


def test_generate_cli_prints_expert_and_answer(smoke, capsys):
    from moa_jax.cli.generate import main
    workdir, _ = smoke
    assert main(["--workdir", workdir, "--prompt", "What is 2 + 3?", "--prompt", "Spell 'cat' backward",
                 "--max_new_tokens", "4"]) == 0
    out = capsys.readouterr().out
    experts = [line for line in out.splitlines() if line.startswith("expert: ")]
    assert len(experts) == 2 and all("[routing=router]" in line for line in experts)
    for line in experts:
        idx, name = line.split()[1], line.split()[2].strip("()")
        assert DOMAIN_NAMES[int(idx)] == name
    assert out.count("answer: ") == 2
    assert main(["--workdir", workdir, "--prompt", "What is 2 + 3?", "--prompt", "Spell 'cat' backward",
                 "--routing", "forced", "--expert", "spell_backward", "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.count("expert: 9 (spell_backward) [routing=forced]") == 2
    assert main(["--workdir", workdir, "--prompt", "hi", "--routing", "oracle"]) == 2
    assert "needs --expert" in capsys.readouterr().err


def test_generate_cli_passes_the_sampling_flags(smoke, capsys, monkeypatch):
    """--temperature / --top-k / --top-p / --seed reach MoAModel.generate (which tests/test_sampling_stream.py
    checks); the model is a stand-in, so nothing compiles."""
    from moa_jax import api
    from moa_jax.cli.generate import main
    seen = {}

    class Model:
        def generate(self, prompts, **kw):
            seen.update(kw)
            return [api.Generation("ok", 0, (1,)) for _ in prompts]
    monkeypatch.setattr(api, "load_run", lambda *a, **kw: Model())
    assert main(["--workdir", smoke[0], "--prompt", "hi", "--temperature", "0.7", "--top-k", "40", "--top-p", "0.9",
                 "--seed", "3"]) == 0
    assert {k: seen[k] for k in ("temperature", "top_k", "top_p", "seed")} == dict(temperature=0.7, top_k=40,
                                                                                   top_p=0.9, seed=3)
    assert "answer: ok" in capsys.readouterr().out


def test_cli_prompt_format_matches_training(smoke):
    """The CLI's encoding of a test question == the prompt tokens training and evaluation used for it."""
    from experiments.registry import get_experiment
    from moa_jax import loading
    from moa_jax.api import MoAModel
    from moa_jax.data.pipeline import load_split
    from moa_jax.data.sources import resolve_system_prompt
    exp = get_experiment("smoke")
    tokenizer = loading.load_tokenizer(loading.DEFAULT_MODEL)
    split = load_split(exp.data, tokenizer, "test")
    model = MoAModel(None, None, None, tokenizer)
    workdir, _ = smoke
    data = json.load(open(os.path.join(workdir, "config.json")))["data"]
    system = resolve_system_prompt(data["system_prompt"], data["source"])
    assert system is not None
    for row in (0, len(split) - 1):
        question = split.example(row)["messages"][-1]["content"]
        assert model.encode_prompt(question, system) == split.tokens(row)[:split.prompt_len[row]].tolist()


def test_reuse_from_takes_matching_stages_and_refuses_a_different_stage1(smoke, tmp_path):
    from moa_jax.config import ConfigError, ModelConfig, MoAConfig
    from moa_jax.workflows.context import _reuse
    workdir, _ = smoke
    saved = json.load(open(os.path.join(workdir, "stage1", "adapters", "config.json")))
    cfg = ModelConfig(**{k: v for k, v in saved["model"].items() if k != "source"})
    moa = MoAConfig(**saved["moa"])
    config = dict(saved, experiment="another_experiment")           # the experiment name does not matter
    trainable, directory = _reuse(workdir, "stage1", config, cfg, moa)
    assert directory == os.path.join(workdir, "stage1") and trainable
    # a run that itself reused stage 1 (no stage1/ of its own; results.json "stages" names the run that trained
    # it) hands on that run's stage 1
    chained = tmp_path / "chained"
    chained.mkdir()
    (chained / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
    (chained / "results.json").write_text(json.dumps({"stages": {"stage1": os.path.join(workdir, "stage1")}}))
    assert _reuse(str(chained), "stage1", config, cfg, moa)[1] == os.path.join(workdir, "stage1")
    assert _reuse(str(chained), "stage2", config, cfg, moa) is None   # not in "stages": trained here
    with pytest.raises(ConfigError, match="no stage-1 adapters"):
        _reuse(str(tmp_path / "missing"), "stage1", config, cfg, moa)
    changed = json.loads(json.dumps(saved))
    changed["train"]["steps"] = 3
    with pytest.raises(ConfigError, match=r"train.steps: 2 -> 3"):
        _reuse(workdir, "stage1", changed, cfg, moa)
    stage2 = json.load(open(os.path.join(workdir, "stage2", "adapters", "config.json")))
    stage2["train"]["eta"] = 5.0
    assert _reuse(workdir, "stage2", stage2, cfg, moa) is None       # differs: trained, not reused


def test_stage1_from_peft_adapters_skips_stage1_and_matches_its_experts(smoke, tmp_path):
    """stage1.init_from_peft: the smoke run's stage-1 experts, exported as PEFT adapters and imported by domain
    name (given in reverse order), evaluate exactly as the trained stage 1 did (single_lora); stage 1 is not
    trained and stage 2 trains the fresh routers."""
    import contextlib
    import io

    from experiments import run
    from moa_jax.train.checkpoint import load_adapters
    from moa_jax.config import MoAConfig
    from moa_jax.export import export_peft
    from moa_jax.peft_import import PeftImportError, experts_for_domains
    workdir, _ = smoke
    trainable, saved = load_adapters(os.path.join(workdir, "stage1", "adapters"))
    moa = MoAConfig(**saved["moa"])
    from moa_jax.config import ModelConfig
    cfg = ModelConfig(**{k: v for k, v in saved["model"].items() if k != "source"})
    dirs = export_peft(trainable, cfg, moa, str(tmp_path / "peft"), expert_names=list(DOMAIN_NAMES))
    specs = ",".join(f"{d}={p}" for d, p in reversed(list(zip(DOMAIN_NAMES, dirs))))
    out_dir = str(tmp_path / "run")
    with contextlib.redirect_stdout(io.StringIO()):
        rc = run.main(["--exp=smoke", f"--workdir={out_dir}", "--no_progress", "--set", "eval.items_per_domain=1",
                       "--set", f"stage1.init_from_peft={specs}", "--set", "eval.methods=single_lora,moa_router",
                       "--set", "stage2.steps=1", "--set", "variants="])
    assert rc == 0
    assert not os.path.exists(os.path.join(out_dir, "stage1"))
    assert os.path.isdir(os.path.join(out_dir, "stage2", "adapters"))
    ours = json.load(open(os.path.join(out_dir, "results.json")))["methods"]["single_lora"]["per_domain"]
    trained = json.load(open(os.path.join(workdir, "results.json")))["methods"]["single_lora"]["per_domain"]
    for d in DOMAIN_NAMES:
        assert ours[d]["ppl"] == pytest.approx(trained[d]["ppl"], rel=1e-5), d
    with pytest.raises(PeftImportError, match=r"domains without an adapter: \['chain_sum'\]"):
        experts_for_domains([f"{d}={p}" for d, p in zip(DOMAIN_NAMES[1:], dirs[1:])], DOMAIN_NAMES, cfg, moa)
