"""The Colab notebook (notebooks/moa_colab_tpu.ipynb) executed end to end on CPU: every code cell but the Colab
install cell runs, in order, in one namespace, with the parameters cell replaced by the smoke experiment (its stages
and baseline loaded from the session's smoke run by `reuse_from`, so the notebook's training cell takes the same path
without training them again).
Checks what each section must produce: the method table, routed answers naming their expert, the PEFT export.
The install cell runs as a dry run (MOA_INSTALL_DRY_RUN=1): it finds the repository and prints the install
commands for this machine's runtime, installing nothing."""
import contextlib
import io
import json
import logging
import os
import sys

import jax
import pytest

from moa_jax.data.tasks import DOMAIN_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "moa_colab_tpu.ipynb")


def _cells():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    return [(c.get("metadata", {}).get("tags", []), "".join(c["source"])) for c in nb["cells"]
            if c["cell_type"] == "code"]


def test_notebook_structure():
    cells = _cells()
    tags = [t for t, _ in cells]
    assert sum("parameters" in t for t in tags) == 1 and sum("colab-only" in t for t in tags) == 1
    for t, src in cells:   # shell / magic lines only in the Colab install cell: the rest is plain Python
        if "colab-only" not in t:
            assert not any(line.lstrip().startswith(("!", "%")) for line in src.splitlines()), src[:200]
            compile(src, NOTEBOOK, "exec")


def test_notebook_runs_on_cpu_with_the_smoke_experiment(smoke, tmp_path):
    workdir = str(tmp_path / "run")
    params = (f"EXPERIMENT = 'smoke'\nOVERRIDES = ['eval.items_per_domain=1', 'variants=', 'reuse_from={smoke[0]}']\n"
              f"WORKDIR = {workdir!r}\n")
    namespace: dict = {"__name__": "__main__"}
    out = io.StringIO()
    root, absl = logging.getLogger(), logging.getLogger("absl")
    saved = (list(root.handlers), root.level, absl.level)    # the notebook configures logging for itself
    try:
        with contextlib.redirect_stdout(out):
            for i, (tags, src) in enumerate(_cells()):
                if "colab-only" in tags:
                    continue
                exec(compile(params if "parameters" in tags else src, f"{NOTEBOOK}[cell {i}]", "exec"), namespace)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        absl.setLevel(saved[2])
    text = out.getvalue()
    assert f"backend {jax.default_backend()}" in text
    for method in ("most_common", "base", "single_lora", "mixed_lora", "moa_router", "moa_oracle"):
        assert any(line.startswith(method + " ") for line in text.splitlines()), (method, text[-2000:])
    answers = [line for line in text.splitlines() if line.strip().startswith("expert ")]
    assert len(answers) == 3, text[-2000:]
    domains = namespace["domains"]
    assert domains == list(DOMAIN_NAMES)                                        # the smoke run's 10 tasks
    assert all(0 <= g.expert < len(domains) for g in namespace["answers"])     # the router chose a real expert
    assert "base model: " in text
    export_dir = os.path.join(workdir, "peft_export")
    assert sorted(os.listdir(export_dir)) == sorted(domains + ["base", "router.json", "router.safetensors",
                                                                    "tokenizer"])
    for d in domains:
        assert os.path.getsize(os.path.join(export_dir, d, "adapter_model.safetensors")) > 1000
    assert os.path.exists(os.path.join(workdir, "results.md"))


def _install_cell() -> str:
    return next(src for tags, src in _cells() if "colab-only" in tags)


@pytest.fixture
def dry_install(monkeypatch):
    """Runs the install cell as a dry run (source edited by `edit`) from `cwd`; restores cwd and sys.path."""
    monkeypatch.setenv("MOA_INSTALL_DRY_RUN", "1")
    saved_path = list(sys.path)

    def run(cwd, edit=lambda src: src):
        monkeypatch.chdir(cwd)
        namespace: dict = {"__name__": "__main__"}
        exec(compile(edit(_install_cell()), f"{NOTEBOOK}[install]", "exec"), namespace)
        return namespace
    yield run
    sys.path[:] = saved_path


def test_install_cell_finds_the_repo_and_prints_the_install_for_this_runtime(dry_install, capfd, tmp_path):
    from scripts.notebook_setup import accelerator
    src = _install_cell()
    assert "YOUR_ORG" not in src and 'REPO_DIR = ""' in src
    namespace = dry_install(ROOT)                                   # run from the repository (cloned, then %cd)
    assert namespace["root"] == ROOT and os.getcwd() == ROOT and sys.path[0] == ROOT
    out = capfd.readouterr().out.splitlines()
    kind = accelerator()[0]
    assert out[0].startswith(f"runtime: {kind}") and "setup_env.sh --system" in out[0]
    assert out[1].startswith(f"{sys.executable} -m pip install -q -e .")     # the package's ranges, not the pins
    assert ("jax[" in out[1]) == (kind != "cpu") and "==" not in out[1]
    # from elsewhere (Colab starts in /content) with REPO_DIR naming the copy
    dry_install(tmp_path, lambda s: s.replace('REPO_DIR = ""', f"REPO_DIR = {ROOT!r}"))
    assert os.getcwd() == ROOT and "runtime: " in capfd.readouterr().out


def test_install_cell_says_what_to_do_without_a_repository(dry_install, tmp_path):
    with pytest.raises(FileNotFoundError, match="clone or upload it .* or set REPO_DIR"):
        dry_install(tmp_path, lambda s: s.replace('REPO_DIR = ""', f"REPO_DIR = {str(tmp_path)!r}"))
