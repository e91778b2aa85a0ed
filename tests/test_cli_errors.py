"""The user-error contract of every CLI (moa_jax/errors.py): a user mistake is one or two `error:` lines naming the
file/line/field/key, exit code 2 and no traceback, found before the model loads where it can be; a bug keeps its
traceback. One subprocess per CLI (each start imports jax: seconds), run in parallel; the other bad inputs go
through the same `main` in-process.
"""
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from moa_jax.config import MoAConfig
from moa_jax.errors import UserError, cli_main
from tests.data_helpers import make_census_dir, make_jsonl_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_LINE = '{"prompt": "a", "response": "b"'


def assert_user_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()   # (experiments.run logs its config to stderr before the error)
    first = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(first) == 1 and len(lines) - first[0] <= 2, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def bad_jsonl_dir(root) -> str:
    make_jsonl_dir(root)
    with open(os.path.join(root, "beta.jsonl"), "a") as f:
        f.write(BAD_LINE + "\n")
    return str(root)


def test_each_cli_reports_a_user_error_in_one_line_with_exit_code_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    run_dir = tmp_path / "run"   # a run whose base model is gone
    (run_dir / "stage2" / "adapters").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"data": {"source": "moa_tasks"}}))
    (run_dir / "stage2" / "adapters" / "config.json").write_text(json.dumps(
        {"moa": dataclasses.asdict(MoAConfig(num_experts=2)), "domains": ["a", "b"],
         "model": {"source": str(tmp_path / "gone.gguf")}}))
    (run_dir / "stage2" / "adapters" / "index.json").write_text("{}")
    data = bad_jsonl_dir(tmp_path / "data")
    commands = {
        "experiments.run": (["--exp=smoke", f"--workdir={blocker}/run"], ["--workdir", "cannot write there"]),
        "moa_jax.cli.generate": (["--workdir", str(run_dir), "--prompt", "hi"], [f"GGUF file {tmp_path}/gone.gguf does "
                                                                             f"not exist"]),
        "moa_jax.data.inspect": (["--source", f"jsonl:{data}", "--tokenizer", "none"],
                                 ["beta.jsonl:13: malformed JSON: the line ends before the JSON value is complete"]),
        "benchmarks.run": (["--suite", "smoke", "--out", str(tmp_path / "b.json"), "--only", "bogus"],
                           ["unknown group(s) ['bogus']", "train"]),
    }
    procs = {m: subprocess.Popen([sys.executable, "-m", m, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for m, (args, _) in commands.items()}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert "Traceback" not in out, (module, out)
        assert_user_error(proc.returncode, err, *commands[module][1])


def run_experiment_cli(capsys, caplog, *args):
    from experiments import run
    with caplog.at_level(logging.INFO, logger="moa_jax"):
        rc = run.main(["--exp=smoke", "--no_progress", *args])
    return rc, capsys.readouterr().err


def test_experiment_cli_user_errors_are_found_before_the_model_loads(tmp_path, capsys, caplog):
    jsonl = ["--set", "moa.num_experts=3", "--set", "data.buckets=64,128,256"]
    rc, err = run_experiment_cli(capsys, caplog, f"--workdir={tmp_path / 'w1'}", "--set",
                                 f"data.source=jsonl:{bad_jsonl_dir(tmp_path / 'bad')}", *jsonl)
    assert_user_error(rc, err, "beta.jsonl:13: malformed JSON")
    assert "base model" not in caplog.text   # the data was checked before the model loaded

    rc, err = run_experiment_cli(capsys, caplog, "--set", "stage1.checkpoint_every=0")
    assert_user_error(rc, err, "TrainConfig.checkpoint_every must be >= 1, got 0; e.g. --set stage1.checkpoint_every")

    good = make_census_dir(tmp_path / "good")   # line-level domains: 5 of them, two of which look like typos
    jsonl[1] = "moa.num_experts=5"
    caplog.clear()
    rc, err = run_experiment_cli(capsys, caplog, f"--workdir={tmp_path / 'w2'}", "--set", f"data.source=jsonl:{good}",
                                 "--set", f"model={tmp_path / 'missing.gguf'}", *jsonl)
    assert_user_error(rc, err, f"GGUF file {tmp_path / 'missing.gguf'} does not exist")
    # the domain table and the typo warnings were logged before the model (whose file is missing) was looked at
    assert re.search(r"\nmath +120  math.jsonl \(120\)\nmth +1  math.jsonl \(1\)", caplog.text), caplog.text
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and "'cdoe'" in warned[0] and "'mth'" in warned[1], warned

    caplog.clear()   # a set expert count must be the data's domain count (unset, it follows the data)
    rc, err = run_experiment_cli(capsys, caplog, f"--workdir={tmp_path / 'w4'}", "--set", f"data.source=jsonl:{good}",
                                 "--set", "moa.num_experts=4")
    assert_user_error(rc, err, "moa.num_experts=4 but the data has 5 domains", "leave moa.num_experts unset (it "
                      "follows the data) or --set moa.num_experts=5")
    assert "base model" not in caplog.text

    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    rc, err = run_experiment_cli(capsys, caplog, f"--workdir={tmp_path / 'w3'}", "--set", f"data.source=jsonl:{good}",
                                 "--set", f"model={corrupt}", *jsonl)
    assert_user_error(rc, err, f"{corrupt} is not a readable GGUF file")

    other = tmp_path / "other_run"   # a work directory holding another configuration's checkpoints
    (other / "stage1" / "checkpoints").mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"model": "tiny-random", "moa": {"rank": 99}}))
    rc, err = run_experiment_cli(capsys, caplog, f"--workdir={other}")
    assert_user_error(rc, err, f"{other} holds a run with moa.rank=99", "this command has moa.rank=4",
                      "use a new --workdir, or --set moa.rank=99")
    assert "base model" not in caplog.text


def test_other_cli_user_errors_in_process(tmp_path, capsys):
    from benchmarks import run as bench
    from moa_jax.cli import generate as generate_cli
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_user_error(cli_main(bench._cli, ["--suite", "smoke", "--out", f"{blocker}/b.json"]),
                      capsys.readouterr().err, f"--out {blocker}: is a file, not a directory")
    assert_user_error(generate_cli.main(["--workdir", str(tmp_path), "--prompt", "hi"]), capsys.readouterr().err,
                      "not a run directory (no config.json)")
    for flags, message in ((["--top-p", "0"], "--top-p 0.0: give a probability in (0, 1]"),
                           (["--top-k", "-2", "--temperature", "1"], "--top-k -2: give a whole number >= 0"),
                           (["--top-k", "5", "--top_p", "0.9"], "--top-k 5 and --top-p 0.9 filter sampling, but "
                                                              "--temperature 0.0 decodes greedily")):
        # sampling flags are checked first of all (here before the work directory is)
        assert_user_error(generate_cli.main(["--workdir", str(tmp_path), "--prompt", "hi", *flags]),
                          capsys.readouterr().err, message)


def test_a_bug_keeps_its_traceback_and_long_messages_keep_their_first_line(capsys):
    def buggy(argv):
        raise KeyError("not a user mistake")

    with pytest.raises(KeyError):
        cli_main(buggy)

    def long_message(argv):
        raise UserError("first line names the file\nsecond\nthird")

    assert cli_main(long_message) == 2
    assert capsys.readouterr().err == "error: first line names the file\n"
