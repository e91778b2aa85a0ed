"""`moa_jax.load_run` and `load_model(adapters=...)` on the session's smoke run (tests/conftest.py `smoke`):
  - the run's domain names (expert order), MoA config and training system prompt come back with the model;
  - forced-expert logits equal the model training built (same base, the stage's adapters, MoATransformer);
  - generate() / encode_prompt() use the run's system prompt by default, None turns it off;
  - export_peft round trip through moa_jax.from_peft gives the same logits;
  - every stage with adapters loads (stage1, mixed_lora with its one expert, an ablation variant);
  - a conflicting moa= (wrong alpha), adapters without a recorded MoA config, a bad work directory, an unfinished
    stage, a moved base model: one clear UserError each, naming what to do;
  - the system-prompt rule (data.sources.resolve_system_prompt) and the function-field checks of checkpoints.
"""
import dataclasses
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import moa_jax
from moa_jax.data.tasks import DOMAIN_NAMES, TASK_SYSTEM_PROMPT
from moa_jax.errors import UserError

QUESTION = "What is 2 + 3?"


@pytest.fixture(scope="module")
def run_model(smoke):
    workdir, _ = smoke
    return moa_jax.load_run(workdir)


def _saved(workdir: str, stage: str = "stage2") -> dict:
    return json.load(open(os.path.join(workdir, stage, "adapters", "config.json")))


def test_load_run_knows_domains_moa_and_system_prompt(smoke, run_model):
    workdir, _ = smoke
    saved = _saved(workdir)
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert run_model.domains == tuple(results["domains"]) == tuple(DOMAIN_NAMES)
    assert run_model.moa == moa_jax.MoAConfig(**saved["moa"]) and run_model.moa.num_experts == 10
    assert run_model.system_prompt == TASK_SYSTEM_PROMPT       # the smoke data is moa_tasks with system_prompt=auto
    assert run_model.source == "tiny-random" and run_model.config.dtype == saved["model"]["dtype"]
    flat = {"/".join(k) for k in __import__("flax").traverse_util.flatten_dict(run_model.trainable)}
    assert flat and all("lora_" in k or "router" in k for k in flat)


def test_forced_logits_equal_the_training_model(smoke, run_model):
    """The reference is assembled as training does: the run's base (load_base_model), the stage's adapters
    (load_adapters) and MoATransformer with the expert fixed."""
    from moa_jax.loading.base import load_base_model
    from moa_jax.nn.model import MoATransformer
    from moa_jax.params import merge_params
    from moa_jax.train.checkpoint import load_adapters
    workdir, _ = smoke
    cfg, frozen, _ = load_base_model("tiny-random", "float32")
    trainable, saved = load_adapters(os.path.join(workdir, "stage2", "adapters"))
    model = MoATransformer(cfg, moa_jax.MoAConfig(**saved["moa"]))
    ids = np.array([run_model.encode_prompt(QUESTION)] * 2)
    mask = jnp.ones(ids.shape, jnp.int32)
    want = model.apply({"params": merge_params(frozen, trainable)}, jnp.asarray(ids), attention_mask=mask,
                       prompt_mask=mask, routing="fixed", expert_idx=jnp.array([3, 7]))[0]
    for row, e in enumerate((3, 7)):
        got = run_model.logits(ids[row:row + 1], routing="forced", expert=e)
        assert np.max(np.abs(got[0] - np.asarray(want[row]))) <= 1e-5, e
    base = run_model.logits(ids[:1], routing="base")
    assert np.max(np.abs(run_model.logits(ids[:1], routing="forced", expert=3) - base)) > 1e-4   # trained experts


def test_generate_uses_the_run_system_prompt(run_model):
    auto = run_model.encode_prompt(QUESTION)
    assert auto == run_model.encode_prompt(QUESTION, TASK_SYSTEM_PROMPT)
    plain = run_model.encode_prompt(QUESTION, None)
    assert TASK_SYSTEM_PROMPT in run_model.tokenizer.decode(auto)
    assert TASK_SYSTEM_PROMPT not in run_model.tokenizer.decode(plain)
    # a system turn in the messages wins over the default
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    assert "Be brief." in run_model.tokenizer.decode(run_model.encode_prompt(own))
    assert TASK_SYSTEM_PROMPT not in run_model.tokenizer.decode(run_model.encode_prompt(own))
    kw = dict(max_new_tokens=3, routing="forced", expert=1)
    default = run_model.generate([QUESTION, "Spell 'cat' backward"], **kw)
    explicit = run_model.generate([QUESTION, "Spell 'cat' backward"], system_prompt=TASK_SYSTEM_PROMPT, **kw)
    by_ids = run_model.generate([auto], **kw)
    assert [g.token_ids for g in default] == [g.token_ids for g in explicit]
    assert default[0].token_ids == by_ids[0].token_ids
    # a plain base model has no system prompt: "auto" adds none
    bare = moa_jax.MoAModel(None, None, None, run_model.tokenizer)
    assert bare.encode_prompt(QUESTION) == plain


def test_export_peft_round_trip(run_model, tmp_path):
    dirs = run_model.export_peft(str(tmp_path / "peft"))
    assert [os.path.basename(d) for d in dirs] == list(run_model.domains)
    assert os.path.exists(tmp_path / "peft" / "router.safetensors")
    back = moa_jax.from_peft(run_model.source, dirs, dtype="float32")
    assert back.domains == run_model.domains
    ids = np.array([run_model.encode_prompt(QUESTION)])
    for e in (0, 9):
        diff = np.max(np.abs(back.logits(ids, routing="forced", expert=e)
                             - run_model.logits(ids, routing="forced", expert=e)))
        assert diff <= 1e-5, (e, diff)


def test_every_trained_stage_loads(smoke):
    workdir, _ = smoke
    mixed = moa_jax.load_run(workdir, "mixed_lora")
    assert mixed.moa.num_experts == 1 and mixed.domains == ("mixed_lora",)
    assert mixed.system_prompt == TASK_SYSTEM_PROMPT
    stage1 = moa_jax.load_run(workdir, "stage1")
    assert stage1.domains == tuple(DOMAIN_NAMES)
    variant = moa_jax.load_run(workdir, "variants/eta0/stage2")
    assert variant.domains == tuple(DOMAIN_NAMES) and variant.moa == stage1.moa
    ids = np.array([variant.encode_prompt(QUESTION)])
    assert np.max(np.abs(variant.logits(ids, routing="forced", expert=2)
                         - stage1.logits(ids, routing="forced", expert=2))) > 0   # its own stage 2


def test_load_model_reads_the_recorded_moa_and_refuses_a_conflict(smoke, tmp_path):
    from moa_jax.api import AdapterConfigError
    workdir, _ = smoke
    adapters = os.path.join(workdir, "stage2", "adapters")
    recorded = moa_jax.MoAConfig(**_saved(workdir)["moa"])
    model = moa_jax.load_model("tiny-random", adapters=adapters)
    assert model.moa == recorded and model.domains == tuple(DOMAIN_NAMES)
    assert model.system_prompt == TASK_SYSTEM_PROMPT
    # fields that do not change the trained function may differ
    vote = moa_jax.load_model("tiny-random", adapters=adapters, moa=dataclasses.replace(recorded, decision="vote"))
    assert vote.moa.decision == "vote"
    with pytest.raises(AdapterConfigError, match=r"alpha=16.0 given, 8.0 trained") as err:
        moa_jax.load_model("tiny-random", adapters=adapters, moa=dataclasses.replace(recorded, alpha=16.0))
    assert isinstance(err.value, UserError)
    with pytest.raises(AdapterConfigError, match=r"use_rslora=True given, False trained, dispatch='soft' given"):
        moa_jax.load_model("tiny-random", adapters=adapters,
                           moa=dataclasses.replace(recorded, use_rslora=True, dispatch="soft"))
    bare = str(tmp_path / "adapters")            # an artifact that records no MoA config
    shutil.copytree(adapters, bare)
    config = json.load(open(os.path.join(bare, "config.json")))
    del config["moa"]
    json.dump(config, open(os.path.join(bare, "config.json"), "w"))
    with pytest.raises(AdapterConfigError, match=r"records no MoA config: pass the one the adapters were trained"):
        moa_jax.load_model("tiny-random", adapters=bare)
    assert moa_jax.load_model("tiny-random", adapters=bare, moa=recorded).moa == recorded
    with pytest.raises(UserError, match=r"no adapter artifact here \(missing config.json, adapters.safetensors\)"):
        moa_jax.load_model("tiny-random", adapters=str(tmp_path))


def test_bad_work_directories_are_clear_errors(smoke, tmp_path):
    from moa_jax.loading import ModelSourceError
    from moa_jax.run_artifacts import RunArtifactError
    workdir, _ = smoke
    with pytest.raises(RunArtifactError, match=r"gone: no such directory"):
        moa_jax.load_run(str(tmp_path / "gone"))
    with pytest.raises(RunArtifactError, match=r"not a run directory \(no config.json\)"):
        moa_jax.load_run(str(tmp_path))
    with pytest.raises(RunArtifactError, match=re.escape("no adapters for stage 'stage3' (this run did not train "
                                                         "it); stages with adapters here: ['mixed_lora', 'stage1', "
                                                         "'stage2', 'variants/eta0/stage2']")):
        moa_jax.load_run(workdir, "stage3")
    unfinished = tmp_path / "unfinished"        # stage 2 still training: checkpoints, no adapters yet
    (unfinished / "stage2" / "checkpoints").mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    with pytest.raises(RunArtifactError, match=r"stage 'stage2' has not finished .* re-run the same experiments.run"):
        moa_jax.load_run(str(unfinished))
    moved = tmp_path / "moved"                  # a run whose base model file is no longer there
    shutil.copytree(os.path.join(workdir, "stage2", "adapters"), moved / "stage2" / "adapters")
    shutil.copy(os.path.join(workdir, "config.json"), moved / "config.json")
    config = _saved(workdir)
    config["model"]["source"] = str(tmp_path / "model.gguf")
    (moved / "stage2" / "adapters" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match=r"model.gguf does not exist .* pass its new location: "
                                               r"moa_jax.load_run\(..., source=PATH\)"):
        moa_jax.load_run(str(moved))
    assert moa_jax.load_run(str(moved), source="tiny-random").domains == tuple(DOMAIN_NAMES)
    del config["domains"]                       # an artifact from before domains were recorded
    (moved / "stage2" / "adapters" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunArtifactError, match=r"records no \['domains'\]"):
        moa_jax.load_run(str(moved))


def test_system_prompt_rule():
    from moa_jax.data.sources import resolve_system_prompt
    assert resolve_system_prompt("auto", "moa_tasks") == TASK_SYSTEM_PROMPT
    assert resolve_system_prompt("auto", "jsonl:/data") is None
    assert resolve_system_prompt(None, "moa_tasks") is None
    assert resolve_system_prompt("", "moa_tasks") == ""
    assert resolve_system_prompt("Be brief.", "hf:x") == "Be brief."


def test_checkpoint_checks_every_field_that_changes_the_function():
    from moa_jax.train.checkpoint import CheckpointMismatchError, check_compatible, config_mismatches
    base = {"model": {"source": "m"}, "moa": dataclasses.asdict(moa_jax.MoAConfig())}

    def changed(**moa):
        return {"model": base["model"], "moa": dict(base["moa"], **moa)}
    for field, value in (("alpha", 64.0), ("use_rslora", True), ("dispatch", "soft"), ("rank", 8),
                         ("targets", ["q_proj"]), ("num_experts", 3), ("router_type", "mlp")):
        with pytest.raises(CheckpointMismatchError, match=rf"moa.{field}="):
            check_compatible(base, changed(**{field: value}), "ckpt")
    # training-only / inference-policy / storage fields, and fields the dispatch or router type do not use
    assert config_mismatches(base, changed(dropout=0.3, decision="vote", adapter_dtype="bfloat16", top_k=5,
                                           router_hidden=7)) == []
    topk = changed(dispatch="token_topk")
    assert [k for k, _, _ in config_mismatches(topk, dict(topk, moa=dict(topk["moa"], top_k=3)))] == ["moa.top_k"]
