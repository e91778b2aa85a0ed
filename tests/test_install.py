"""The installable package: `pip install .` and the `moa-jax` console script.
  - the dispatcher (moa_jax/cli/main.py), in-process: `--help` lists every subcommand on one line, each subcommand
    reaches its command line (`moa-jax generate --help` is generate's help), no subcommand or an unknown one is
    one `error:` line and exit code 2;
  - setup.cfg's dependencies are ranges that hold the exact pins of requirements.txt / requirements-test.txt (the
    same packages, each pin inside its range, as the lower bound);
  - a real install into a fresh venv (no network, no build isolation): the ranges resolve against the tested
    environment without changing it, the console script runs, `import moa_jax` from a neutral folder finds the
    installed copy, the installed metadata carries the ranges, and site-packages holds moa_jax and experiments but
    no benchmarks, scripts or tests.
"""
import configparser
import contextlib
import importlib.metadata
import io
import json
import os
import shutil
import site
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from moa_jax.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:   # a sub-CLI's argparse --help
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------------- the dispatcher

def test_help_lists_every_subcommand_on_one_line():
    rc, out, _ = _cli(["--help"])
    assert rc == 0 and out.startswith("usage: moa-jax SUBCOMMAND")
    assert set(cli.SUBCOMMANDS) == {"train", "generate", "inspect", "route-serve"}
    for name, sub in cli.SUBCOMMANDS.items():
        lines = [line for line in out.splitlines() if line.startswith(f"  {name} ")]
        assert len(lines) == 1 and f"(python -m {sub.module})" in lines[0], (name, out)


@pytest.mark.parametrize("name", ["train", "generate", "inspect", "route-serve"])
def test_each_subcommand_reaches_its_command_line(name):
    rc, out, _ = _cli([name, "--help"])
    assert rc == 0 and out.startswith(f"usage: python -m {cli.SUBCOMMANDS[name].module} "), out[:300]
    flag = {"train": "--exp", "generate": "--workdir", "inspect": "--source", "route-serve": "--upstream"}[name]
    assert flag in out


@pytest.mark.parametrize("argv, message", [
    (["bogus"], "unknown subcommand 'bogus': choose from train, generate, inspect, route-serve"),
    (["--exp=smoke"], "unknown subcommand '--exp=smoke'"),
    ([], "give a subcommand (train, generate, inspect, route-serve)"),
])
def test_no_or_unknown_subcommand_is_one_error_line(argv, message):
    rc, out, err = _cli(argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_arguments_pass_through_unchanged():
    rc, out, _ = _cli(["train", "--list"])
    assert rc == 0 and any(line.split()[0] == "smoke" for line in out.splitlines() if line.strip()), out


# ------------------------------------------------------------------------------------------- the metadata

def _ranges(section: str, key: str) -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    lines = [line.strip() for line in cfg[section][key].splitlines()]
    reqs = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(r.name): r for r in reqs}


def _pins(path: str) -> dict[str, str]:
    out = {}
    for line in open(os.path.join(ROOT, path)):
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-r"):
            name, version = line.split("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def _check_ranges_hold_pins(ranges: dict[str, Requirement], pins: dict[str, str]) -> None:
    assert sorted(ranges) == sorted(pins)
    for name, req in ranges.items():
        ops = {s.operator: s.version for s in req.specifier}
        assert set(ops) == {">=", "<"} and ops[">="] == pins[name], (name, str(req.specifier), pins[name])
        assert req.specifier.contains(pins[name]), (name, str(req.specifier))


def test_install_requires_are_ranges_around_the_pins():
    _check_ranges_hold_pins(_ranges("options", "install_requires"), _pins("requirements.txt"))
    test_pins = {k: v for k, v in _pins("requirements-test.txt").items() if k != "execnet"}   # xdist's own dep
    _check_ranges_hold_pins(_ranges("options.extras_require", "test"), test_pins)


# ------------------------------------------------------------------------------------------- a real install

def _source_copy(dst: str) -> str:
    """The repository's Python sources and packaging files (the build writes build/ and *.egg-info into it)."""
    def ignore(folder, names):
        return [n for n in names if n == "__pycache__"
                or (os.path.isfile(os.path.join(folder, n)) and not n.endswith(".py"))]
    os.makedirs(dst)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dst)
    for name in ("moa_jax", "experiments", "benchmarks", "scripts", "tests"):   # every folder with __init__.py
        shutil.copytree(os.path.join(ROOT, name), os.path.join(dst, name), ignore=ignore)
    return dst


def test_pip_install_gives_the_library_and_the_console_script(tmp_path):
    src, venv, elsewhere = _source_copy(str(tmp_path / "src")), str(tmp_path / "venv"), str(tmp_path / "elsewhere")
    os.makedirs(elsewhere)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def run(*cmd):
        done = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-4000:])
        return done.stdout

    # --system-site-packages reaches the base interpreter's packages, not those of a venv the tests run in, and
    # the venv's own ensurepip setuptools cannot build a wheel without `wheel`: instead the new venv reads the
    # running interpreter's site-packages through a .pth file (its setuptools, wheel and pip; no network).
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    python = os.path.join(venv, "bin", "python")
    venv_site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    with open(os.path.join(venv_site, "running_interpreter.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    # The ranges resolve against the tested environment (the exact pins, the test extra too) and keep all of it:
    # the one thing to install is moa_jax itself (as in a Colab runtime whose jax is in range).
    report = json.loads(run(python, "-m", "pip", "install", "-q", "--dry-run", "--report", "-", "--no-index",
                            "--no-build-isolation", "--no-cache-dir", src + "[test]"))
    assert [i["metadata"]["name"] for i in report["install"]] == ["moa_jax"], report["install"]
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "--ignore-installed", "--no-cache-dir", src)

    usage = run(os.path.join(venv, "bin", "moa-jax"), "--help")
    assert all(f"\n  {name} " in usage for name in ("train", "generate", "inspect")), usage
    assert "smoke" in run(os.path.join(venv, "bin", "moa-jax"), "train", "--list")   # the installed presets
    where = run(python, "-c", "import moa_jax, experiments; print(moa_jax.__file__); print(experiments.__file__)")
    assert all(p.startswith(venv_site + os.sep) for p in where.split()), (where, venv_site)

    top = sorted(n for n in os.listdir(venv_site) if not n.endswith((".dist-info", ".pth")))
    assert top == ["experiments", "moa_jax"], top
    dist = next(importlib.metadata.distributions(path=[venv_site]))
    requires = [r for r in map(Requirement, dist.requires) if not r.marker]
    assert len(requires) == len(_ranges("options", "install_requires"))
    assert all(not any(s.operator == "==" for s in r.specifier) and len(r.specifier) == 2 for r in requires), \
        [str(r) for r in requires]
