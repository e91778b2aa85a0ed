"""The compile-only memory planner (`python -m benchmarks.memory`) on a tiny shape, and the moa_7b preset's config.

The planner runs in a subprocess (it sets XLA_FLAGS before jax starts); `smoke` is a 2-layer model, so a compile
takes a few seconds.
"""
import json
import os
import subprocess
import sys

import pytest

from experiments.registry import MODEL_REQUIRED, check_runnable, get_experiment
from moa_jax.config import ConfigError
from moa_jax.overrides import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def planner(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "benchmarks.memory", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_planner_prints_one_json_line_per_device():
    """Two fake devices with FSDP: one JSON line whose peak is argument + output + temp - alias, an analytic model
    beside it, and per-device parameter bytes below the unsharded base."""
    out = planner("--shape", "smoke", "--batch", "4", "--seq", "32", "--experts", "4", "--rank", "4",
                  "--devices", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert d["devices"] == 2 and d["fsdp"] and d["remat"] == "full" and d["seq"] == 32
    assert d["peak_bytes"] == d["argument_bytes"] + d["output_bytes"] + d["temp_bytes"] - d["alias_bytes"] > 0
    a = d["analytic"]
    assert a["total_bytes"] == a["params_bytes"] + a["optimizer_bytes"] + a["grads_bytes"] + a["activations_bytes"]
    base_bf16 = 2 * d["base_params"]
    assert a["params_bytes"] - 4 * d["adapter_params"] < 0.75 * base_bf16  # the base is split over 2 devices
    assert d["argument_bytes"] >= a["params_bytes"] + a["optimizer_bytes"]


def test_planner_user_errors_exit_2():
    bad = planner("--shape", "llama-99b", "--batch", "1", "--seq", "8")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    odd = planner("--shape", "smoke", "--batch", "3", "--seq", "8", "--devices", "2")
    assert odd.returncode == 2 and "divisible" in odd.stderr


def test_planner_plans_an_int8_base():
    """--quantize int8 plans the int8 frozen tree: fewer argument bytes than the bf16 one."""
    args = ("--shape", "smoke", "--batch", "2", "--seq", "16", "--experts", "2", "--rank", "2")
    out = planner(*args, "--quantize", "int8")
    assert out.returncode == 0, out.stderr[-2000:]
    int8, bf16 = json.loads(out.stdout), json.loads(planner(*args).stdout)
    assert int8["quantize"] == "int8" and int8["argument_bytes"] < bf16["argument_bytes"]


def test_moa_7b_preset_resolves_and_needs_a_model(tmp_path):
    exp = get_experiment("moa_7b")
    assert exp.model == MODEL_REQUIRED and exp.dtype == "bfloat16" and exp.remat == "full" and exp.mesh.fsdp
    with pytest.raises(ConfigError, match="--set model=DIR"):
        check_runnable(exp)
    ready = apply_overrides(exp, [f"model={tmp_path}", "remat=projections", "loss_chunk=512"])
    check_runnable(ready)
    assert (ready.model, ready.remat, ready.loss_chunk) == (str(tmp_path), "projections", 512)
    with pytest.raises(ConfigError, match="remat='fast' is not one of"):
        apply_overrides(exp, ["remat=fast"])
    run = subprocess.run([sys.executable, "-m", "experiments.run", "--exp=moa_7b", f"--workdir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--set model=DIR" in run.stderr and "Traceback" not in run.stderr
