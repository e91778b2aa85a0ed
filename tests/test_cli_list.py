"""`python -m experiments.run --list` and `--help`: every registered experiment with its one-line summary, the
budget note, and help text on every flag (also on the generate and data.inspect CLIs)."""
import argparse
import contextlib
import importlib
import io
import os
import subprocess
import sys

import pytest

from experiments import run
from experiments.registry import EXPERIMENTS


def _main(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = run.main(argv)
        except SystemExit as e:   # argparse's --help
            rc = e.code
    return rc, out.getvalue()


def test_list_names_every_experiment_with_its_summary():
    rc, text = _main(["--list"])
    assert rc == 0
    lines = text.splitlines()
    assert len(lines) == len(EXPERIMENTS)
    for name, fn in EXPERIMENTS.items():
        first = fn.__doc__.strip().splitlines()[0].strip()
        assert any(line.split()[0] == name and first in line for line in lines), (name, text)


def test_help_lists_experiments_budgets_and_explains_every_flag():
    rc, text = _main(["--help"])
    assert rc == 0
    for name in EXPERIMENTS:
        assert f"\n  {name} " in text, name
    assert "reduced CPU budget" in text and "full accelerator budget" in text
    for action in run.build_parser()._actions:
        assert action.help, action.option_strings


def test_missing_exp_is_a_usage_error():
    rc, _ = _main([])
    assert rc == 2


def test_list_as_a_module_has_no_warning():
    root = os.path.dirname(os.path.dirname(os.path.abspath(run.__file__)))
    proc = subprocess.run([sys.executable, "-m", "experiments.run", "--list"], capture_output=True, text=True,
                          timeout=120, cwd=root)
    assert proc.returncode == 0 and "smoke" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("module", ["moa_jax.cli.generate", "moa_jax.data.inspect"])
def test_other_clis_explain_every_flag(module, monkeypatch):
    """The parser each CLI builds (caught at parse_args) has help text on every option."""
    parsers = []
    real = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        parsers.append(self)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        importlib.import_module(module)._main(["--help"])
    assert e.value.code == 0 and len(parsers) == 1
    actions = parsers[0]._actions
    assert len(actions) >= 8 and [a.dest for a in actions if not a.help] == []
