"""README.md and docs/: the front page stays short and points at every page, and what the pages show runs.
  - README.md is under 220 lines and links every docs/*.md page; every relative link in README.md and docs/*.md
    resolves to a file;
  - the quick start's test command is the one .ci/run runs, and its first command sets up and runs moa_10task;
  - every repository path (`moa_jax/...py`, `docs/...`) and every `python -m MODULE` the pages name exists, and
    docs/layout.md names every module and sub-package of moa_jax;
  - the code examples run as written, paths pointed at the session's smoke run (tests/conftest.py `smoke`):
    README "Library API" and docs/api.md "Use a finished run" (load_run, generate, export), docs/serving.md's
    reference router (in a process where jax cannot be imported) and docs/data.md's pipeline and JSONL examples.
docs/example_api.py (docs/api.md's load_model example, runnable) runs in tests/test_parity.py.
"""
import contextlib
import dataclasses
import glob
import io
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MAX_README_LINES = 220


def _text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _block(path: str, title: str, lang: str = "python") -> str:
    """The first ```lang code block after the heading `title` of a markdown file."""
    text = _text(os.path.join(ROOT, path))
    assert title in text, f"{path}: no section {title!r}"
    section = text[text.index(title):]
    start = section.index(f"```{lang}\n") + len(f"```{lang}\n")
    return section[start:section.index("\n```", start)]


def _links(path: str) -> list[str]:
    """The relative link targets of a markdown file (no URLs, no in-page anchors), anchors stripped."""
    targets = re.findall(r"\]\(([^)\s]+)\)", _text(path))
    return [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


# ---------------------------------------------------------------------------------------------- structure

def test_readme_is_a_short_page_that_links_every_docs_page():
    lines = _text(README).splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines; move depth into docs/"
    linked = {os.path.normpath(os.path.join(ROOT, t)) for t in _links(README)}
    unlinked = [os.path.relpath(p, ROOT) for p in PAGES if os.path.normpath(p) not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    assert any(t.startswith("docs/") for t in _links(README))


@pytest.mark.parametrize("path", [README] + PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(path):
    broken = [t for t in _links(path) if not os.path.exists(os.path.join(os.path.dirname(path), t))]
    assert not broken, f"{os.path.relpath(path, ROOT)}: links to missing files: {broken}"


def test_quick_start_is_what_ci_runs():
    quick = _block("README.md", "## Quick start", "bash")
    commands = [line for line in quick.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    ci = [line for line in _text(os.path.join(ROOT, ".ci", "run")).splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [commands[1]], (ci, commands[1])
    assert commands[0] == "bash scripts/setup_env.sh && .venv/bin/python -m experiments.run --exp=moa_10task"


PATH_RE = re.compile(r"(?<![\w/.])((?:moa_jax|experiments|benchmarks|docs|scripts|notebooks|tests)/[\w/.\-]*\w)")


OTHER_PROJECTS_MODULES = ("pytest", "sglang.launch_server")   # `python -m` commands of other projects the pages show


@pytest.mark.parametrize("path", [README] + PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_named_paths_and_modules_exist(path):
    """No stale path: every repository path and every `python -m` module the page names is there."""
    text = _text(path)
    missing = sorted({p for p in PATH_RE.findall(text) if not os.path.exists(os.path.join(ROOT, p))})
    assert not missing, f"{os.path.relpath(path, ROOT)} names missing paths: {missing}"
    for module in sorted(set(re.findall(r"python -m ([\w.]+)", text))):
        if module in OTHER_PROJECTS_MODULES:
            continue
        base = os.path.join(ROOT, *module.split("."))
        assert (os.path.exists(base + ".py") or os.path.exists(os.path.join(base, "__main__.py"))), \
            f"{os.path.relpath(path, ROOT)}: `python -m {module}` has no module"


def test_layout_names_every_module():
    """docs/layout.md lists every top-level module and sub-package of moa_jax (a new one needs its line there)."""
    text = _text(os.path.join(ROOT, "docs", "layout.md"))
    package = os.path.join(ROOT, "moa_jax")
    names = [f"moa_jax/{n}" + ("/" if os.path.isdir(os.path.join(package, n)) else "")
             for n in sorted(os.listdir(package))
             if (n.endswith(".py") and n != "__init__.py")
             or os.path.exists(os.path.join(package, n, "__init__.py"))]
    unnamed = [n for n in names if n not in text]
    assert not unnamed, f"docs/layout.md does not name {unnamed}"


# ------------------------------------------------------------------------------------------- the examples

def _run_finished_run_example(code: str, workdir: str, out_dir, name: str) -> tuple[list[str], dict]:
    assert 'moa_jax.load_run("runs/moa_10task")' in code and '"export/' in code
    code = code.replace('"runs/moa_10task"', repr(workdir)).replace('"export/', f'"{out_dir}/export/')
    code = code.replace('"smollm2-135m-instruct"', '"tiny-random"')   # the smoke run's base model
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), namespace)
    return out.getvalue().splitlines(), namespace


def _answers(lines: list[str]) -> list[str]:
    from moa_jax.data.tasks import DOMAIN_NAMES
    return [line for line in lines if line.split(" ", 1)[0] in DOMAIN_NAMES]   # (answers may hold "\n")


def test_readme_api_example_runs(smoke, tmp_path):
    from moa_jax.data.tasks import DOMAIN_NAMES
    workdir, _ = smoke
    lines, ns = _run_finished_run_example(_block("README.md", "## Library API"), workdir, tmp_path,
                                          "README.md[Library API]")
    assert len(_answers(lines)) >= 2 and lines[0] in _answers(lines), lines
    assert sorted(os.listdir(tmp_path / "export" / "peft")) == sorted(   # base/: the weights the run trained on
        list(DOMAIN_NAMES) + ["base", "router.json", "router.safetensors", "tokenizer"])
    assert ns["logits"].shape == (1, len(ns["ids"]), ns["fresh"].config.vocab_size)


def test_api_finished_run_example_runs(smoke, tmp_path):
    from moa_jax.data.tasks import DOMAIN_NAMES, TASK_SYSTEM_PROMPT
    workdir, _ = smoke
    lines, ns = _run_finished_run_example(_block("docs/api.md", "## Use a finished run"), workdir, tmp_path,
                                          "docs/api.md[Use a finished run]")
    assert lines[0] == str(tuple(DOMAIN_NAMES)) and lines[1] == TASK_SYSTEM_PROMPT
    answers = _answers(lines[2:])
    assert len(answers) >= 2 and lines[2] in answers, lines
    assert sorted(os.listdir(tmp_path / "export" / "peft")) == sorted(   # + the run's tokenizer for the router
        list(DOMAIN_NAMES) + ["base", "router.json", "router.safetensors", "tokenizer"])
    assert os.path.exists(tmp_path / "export" / "merged-chain_sum" / "model.safetensors")
    assert len(ns["plain"]) == 1 and ns["adapters"][0].endswith("chain_sum")


def test_serving_reference_router_example_runs(smoke, tmp_path):
    """docs/serving.md's example as written on a servable export (the smoke run's routers exported as
    route_on=probe): the export's base/ (the weights the run trained on) is the base it loads, offline; it runs
    without jax and picks moa_jax's expert."""
    import moa_jax
    workdir, _ = smoke
    model = moa_jax.load_run(workdir)
    servable = dataclasses.replace(model, moa=dataclasses.replace(model.moa, route_on="probe"))
    out = str(tmp_path / "export" / "peft")
    servable.export_peft(out)
    code = _block("docs/serving.md", "## Servable routing")
    question = 'router.route("What is 2 + 3?")'
    assert 'reference_router.load("export/peft")' in code and code.rstrip().splitlines()[-1].startswith(question)
    code = code.replace(question, f"print({question})").replace('"export/peft"', repr(out))
    script = "import sys\nsys.modules['jax'] = None; sys.modules['flax'] = None\n" + code  # jax cannot be imported
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    routed = proc.stdout.strip().splitlines()[-1]
    ours = servable.generate(["What is 2 + 3?"], max_new_tokens=1)[0].expert
    assert routed == model.domains[ours], (routed, model.domains[ours])


def test_data_pipeline_example_runs(tmp_path):
    """docs/data.md's first example, on the `tiny` builder config (the page's is `default`) built into a temporary
    data dir, with the embedded model's tokenizer."""
    import jax
    from moa_jax.data.moa_tasks import prepare
    from moa_jax.loading import DEFAULT_MODEL, load_tokenizer
    prepare("tiny", str(tmp_path))
    code = _block("docs/data.md", "# Data:")
    assert "cfg = DataConfig()" in code
    code = code.replace("cfg = DataConfig()", f"cfg = DataConfig(builder_config='tiny', data_dir={str(tmp_path)!r})")
    namespace = {"tokenizer": load_tokenizer(DEFAULT_MODEL), "jax": jax}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "docs/data.md[first example]", "exec"), namespace)
    assert set(namespace["batch"]) >= {"tokens", "loss_mask", "prompt_mask", "attention_mask", "domain", "index",
                                       "valid"}


# The worked example's training, shrunk for the suite (the page's command takes about a minute; compiling is most of
# it): one stage-2 step on stage 1's fresh experts (one train step compiled, not two), MoA only, one test item per
# domain, no ablation variant.
WORKED_EXAMPLE_SHRINK = ("stage1.steps=0", "stage2.steps=1", "eval.methods=moa_oracle", "eval.items_per_domain=1",
                         "eval.max_new_tokens=2", "variants=", "data.buckets=64", "data.max_len=64")


def test_data_jsonl_worked_example_runs(tmp_path, monkeypatch):
    """docs/data.md's worked JSONL example as written: bash writes the files; the `python -m` commands run in-process
    through their modules' main (start-up and the embedded GGUF read shared): inspect lists both domains, the
    training runs to its report (shrunk by WORKED_EXAMPLE_SHRINK) with moa.num_experts following the data (2); the
    Python config loads the files."""
    import json
    import shlex

    from experiments import run
    from moa_jax.data import inspect, load_split
    from tests.data_helpers import tiny_tokenizer
    shell = _block("docs/data.md", "Worked example:", "bash").splitlines()
    commands = [shlex.split(line) for line in shell if line.startswith("python -m ")]
    assert [c[2] for c in commands] == ["moa_jax.data.inspect", "experiments.run"], shell
    assert not any("num_experts" in arg for arg in commands[1])   # it follows the data
    proc = subprocess.run(["bash", "-c", "\n".join(line for line in shell if not line.startswith("python -m "))],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]

    monkeypatch.chdir(tmp_path)   # the commands' relative paths: mydata/, runs/mydata
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert inspect.main(commands[0][3:]) == 0
    assert "double" in out.getvalue() and "square" in out.getvalue(), out.getvalue()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert run.main(commands[1][3:] + ["--no_progress"] + [f"--set={s}" for s in WORKED_EXAMPLE_SHRINK]) == 0
    assert "report: runs/mydata/results.md" in out.getvalue()
    for stage in ("stage1", "stage2"):
        saved = json.load(open(tmp_path / "runs" / "mydata" / stage / "adapters" / "config.json"))
        assert saved["moa"]["num_experts"] == 2 and saved["domains"] == ["double", "square"]

    code = _block("docs/data.md", "Worked example:")
    namespace: dict = {}
    exec("from moa_jax.config import DataConfig\n" + code, namespace)
    cfg = dataclasses.replace(namespace["cfg"], source=f"jsonl:{tmp_path / 'mydata'}", holdout_fraction=0.0)
    train_split = load_split(cfg, tiny_tokenizer(), "train")
    assert len(train_split) == 200 and train_split.domains == ("square", "double")
