"""The experiment runner end to end ("has a pulse"), resume of a finished run, and typed `--set` overrides.

The smoke run is `python -m experiments.run --exp=smoke` shrunk further with --set (2 of the 10 tiny domains, so 2
experts: moa.num_experts follows the data; batch 2, one evaluation method on one item per domain); the vocabulary is
still the embedded tokenizer's 49k.
"""
import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest

from experiments.registry import get_experiment
from experiments.run import main
from moa_jax.config import ConfigError, DataConfig, ExperimentConfig
from moa_jax.overrides import apply_overrides, valid_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRINK = ["data.domains=chain_sum,spell_backward", "data.batch_size=2",
          "data.buckets=64,128", "data.max_len=128", "eval.methods=moa_oracle", "eval.items_per_domain=1",
          "eval.max_new_tokens=2", "eval.batch_size=2", "variants="]
STAGES = ("stage1", "stage2")


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def stage_snapshot(workdir):
    """Per stage: metrics.jsonl line count and the finished checkpoint steps."""
    out = {}
    for stage in STAGES:
        with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
            lines = sum(1 for line in f if line.strip())
        steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, stage, "checkpoints")) if d.isdigit())
        out[stage] = (lines, steps)
    return out


def comparable(results: dict, prefix: str = "") -> dict:
    """results.json flattened to dotted keys, without what differs between equal runs: timings (the routing
    study's time shares too) and the paths of the stage folders and figures."""
    out = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(comparable(v, key + "."))
        elif not (k.endswith("seconds") or k == "share_of_prefill" or key.startswith(("stages.", "figures."))):
            out[key] = v
    return out


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """One CPU device (conftest forces 8 for the sharding tests; the smoke batch of 2 does not divide 8) and a
    compilation cache shared by this module's runs (their programs are the same)."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                  if not f.startswith("--xla_force_host_platform_device_count")))


def shrunk_args(workdir) -> list[str]:
    return ["--exp=smoke", f"--workdir={workdir}", "--no_progress"] + [f"--set={s}" for s in SHRINK]


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory, cli_env):
    """The shrunk smoke run, alone on its work directory -> (workdir, its results.json as written)."""
    workdir = str(tmp_path_factory.mktemp("fresh") / "run")
    first = run_cli(*shrunk_args(workdir), env=cli_env)
    assert first.returncode == 0, first.stderr[-4000:]
    with open(os.path.join(workdir, "results.json")) as f:
        return workdir, json.load(f)


def test_a_second_run_on_the_same_workdir_exits_2_and_the_first_finishes_unchanged(tmp_path, cli_env, fresh_run):
    """Two runs started on one work directory: the second exits 2 naming the first's pid while the first trains,
    and the first finishes with results equal to the same run alone (every value but timings and paths) and with
    each metrics row once."""
    workdir, log = str(tmp_path / "run"), tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "experiments.run", *shrunk_args(workdir)], cwd=ROOT,
                                 env=cli_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        metrics = os.path.join(workdir, "stage1", "metrics.jsonl")
        while first.poll() is None and not os.path.exists(metrics):   # the first run is training stage 1
            time.sleep(0.05)
        assert first.poll() is None, log.read_text()[-4000:]
        first.send_signal(signal.SIGSTOP)   # still running (and holding the lock) however fast this machine is
        try:
            second = run_cli(*shrunk_args(workdir), env=cli_env)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-4000:]
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: {workdir} is in use by another run (pid {first.pid}); wait for it to finish or use another "
            f"--workdir")
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, log.read_text()[-4000:]
    with open(os.path.join(workdir, "results.json")) as f:
        assert comparable(json.load(f)) == comparable(fresh_run[1])
    assert stage_snapshot(workdir) == stage_snapshot(fresh_run[0])   # no metrics row written twice


@pytest.mark.slow  # one run of the CLI beside the shared first run: mostly start-up and compilation
def test_smoke_experiment_runs_then_resumes_without_retraining(cli_env, fresh_run):
    workdir, _ = fresh_run
    args = shrunk_args(workdir)
    env = cli_env

    for name in ("config.json", "results.json", "results.md"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["experiment"] == "smoke" and results["domains"] == ["chain_sum", "spell_backward"]
    assert set(results["methods"]) == {"moa_oracle"}
    with open(os.path.join(workdir, "results.md")) as f:
        assert "moa_oracle" in f.read()
    smoke = get_experiment("smoke")
    for stage in STAGES:
        for name in ("adapters/adapters.safetensors", "adapters/config.json", "metrics.jsonl"):
            assert os.path.exists(os.path.join(workdir, stage, name)), (stage, name)
        with open(os.path.join(workdir, stage, "adapters", "config.json")) as f:
            assert json.load(f)["moa"]["num_experts"] == 2   # not set: one expert per domain of the data
    before = stage_snapshot(workdir)
    for stage in STAGES:
        tcfg, (lines, ckpts) = getattr(smoke, stage), before[stage]
        assert lines == tcfg.steps // tcfg.log_every and ckpts and max(ckpts) == tcfg.steps, (stage, before)
    os.remove(os.path.join(workdir, "results.json"))

    second = run_cli(*args, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    assert stage_snapshot(workdir) == before  # nothing retrained: no new metrics lines, no new checkpoints
    assert os.path.exists(os.path.join(workdir, "results.json"))


# ---- --set on the command line ----

def test_cli_rejects_unknown_key_with_valid_keys():
    result = run_cli("--exp=smoke", "--set", "moa.rnak=4", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "moa.rnak: unknown key" in result.stderr
    assert "moa.rank" in result.stderr and "stage1.learning_rate" in result.stderr  # the list of valid keys


@pytest.mark.parametrize("assignment, message", [
    ("stage1.steps=ten", "stage1.steps='ten': expected int"),
    ("stage1.learning_rate=fast", "stage1.learning_rate='fast': expected float"),
    ("stage2.freeze_experts=maybe", "stage2.freeze_experts='maybe': expected a boolean"),
    ("data.buckets=64,abc", "data.buckets"),
    ("moa.targets=q,nonsense", "MoAConfig.targets: unknown projection 'nonsense'"),
    ("moa", "expected key=value"),
    ("moa=3", "moa: is a section"),
    ("stage1.steps.x=1", "steps has no sub-fields"),
])
def test_cli_rejects_bad_values_naming_the_field(capsys, assignment, message):
    assert main(["--exp=smoke", "--set", assignment]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_unknown_experiment(capsys):
    assert main(["--exp=nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err


# ---- apply_overrides ----

def test_overrides_parse_each_field_type():
    base = ExperimentConfig()
    cfg = apply_overrides(base, [
        "stage1.steps=7",                    # int
        "stage2.learning_rate=3e-4",         # float
        "stage2.freeze_experts=yes",         # bool
        "stage1.checkpoint_every=5",
        "moa.targets=q,v_proj",              # tuple (normalised by MoAConfig)
        "data.buckets=32,64",                # tuple of ints
        "data.max_len=64",
        "eval.methods=base,moa_router",
        "data.data_dir=/tmp/x",              # Optional[str]
        "model=tiny-random",                 # str
        "mesh.expert=2",
    ])
    assert cfg.stage1.steps == 7 and isinstance(cfg.stage1.steps, int)
    assert cfg.stage2.learning_rate == 3e-4 and isinstance(cfg.stage2.learning_rate, float)
    assert cfg.stage2.freeze_experts is True
    assert cfg.moa.targets == ("q_proj", "v_proj")
    assert cfg.data.buckets == (32, 64) and cfg.data.max_len == 64
    assert cfg.eval.methods == ("base", "moa_router")
    assert cfg.data.data_dir == "/tmp/x" and cfg.model == "tiny-random" and cfg.mesh.expert == 2
    # untouched fields and the input are unchanged
    assert cfg.stage2.steps == base.stage2.steps and base.stage1.steps != 7
    for raw, value in [("true", True), ("0", False), ("off", False), ("ON", True)]:
        assert apply_overrides(base, [f"stage2.freeze_experts={raw}"]).stage2.freeze_experts is value
    assert apply_overrides(base, ["stage1.learning_rate=1"]).stage1.learning_rate == 1.0


def test_overrides_optional_fields():
    base = ExperimentConfig()
    assert apply_overrides(base, ["data.data_dir=none"]).data.data_dir is None
    assert apply_overrides(base, ["data.data_dir=/d", "data.data_dir=null"]).data.data_dir is None  # last one wins
    assert apply_overrides(base, ["data.system_prompt=None"]).data.system_prompt is None
    # DataConfig documents "any string (even ''): that system message": an empty value is the empty string
    assert apply_overrides(base, ["data.system_prompt="]).data.system_prompt == ""
    assert apply_overrides(base, ["data.system_prompt=Be brief."]).data.system_prompt == "Be brief."


def test_overrides_of_one_section_apply_together_in_any_order():
    """data.buckets and data.max_len are validated against each other: either order of --set must work."""
    base = ExperimentConfig()
    for order in (["data.buckets=64,128", "data.max_len=128"], ["data.max_len=128", "data.buckets=64,128"]):
        cfg = apply_overrides(base, order)
        assert cfg.data.buckets == (64, 128) and cfg.data.max_len == 128
    with pytest.raises(ConfigError, match=r"DataConfig.max_len=256 must be in \[2, largest bucket 128\]"):
        apply_overrides(base, ["data.buckets=64,128"])


def test_overrides_unknown_keys_list_the_valid_ones():
    keys = valid_keys(ExperimentConfig())
    assert "moa.rank" in keys and "data.buckets" in keys and "mesh.expert" in keys and "moa" not in keys
    assert len(keys) == len(set(keys))
    for bad in ("moa.rnak=1", "nope=1", "data.buckets.x=1"):
        with pytest.raises(ConfigError) as err:
            apply_overrides(ExperimentConfig(), [bad])
        assert "moa.rank" in str(err.value) and bad.split("=")[0] in str(err.value)


def test_overrides_type_against_the_annotation_not_the_current_value():
    """Optional[int]-like fields and tuples are parsed by their annotation, whatever the current value is."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Inner:
        size: Optional[int] = None
        sizes: tuple = ()
        ints: tuple[int, ...] = ()

    @dataclass(frozen=True)
    class Outer:
        inner: Inner = Inner()
        ratio: float = 1.0

    cfg = apply_overrides(Outer(), ["inner.size=3", "inner.sizes=a, b", "inner.ints=1,2", "ratio=2"])
    assert cfg == Outer(Inner(3, ("a", "b"), (1, 2)), 2.0)
    assert apply_overrides(cfg, ["inner.size=none"]).inner.size is None
    assert apply_overrides(cfg, ["inner.size="]).inner.size is None
    with pytest.raises(ConfigError, match=r"inner.ints='x': expected int"):
        apply_overrides(Outer(), ["inner.ints=1,x"])
    with pytest.raises(ConfigError, match=r"inner.size='1.5': expected int"):
        apply_overrides(Outer(), ["inner.size=1.5"])
    assert isinstance(DataConfig().buckets, tuple)
