"""Fault tests of issue 24 (the table in docs/faults.md): names from data never become paths, a work directory holds
one run at a time, a failing background checkpoint save stops the run, values that cannot fit are refused up front,
and the smaller contracts (a non-writable data folder, a run killed in stage 1). Checkpoint damage and kills are in
tests/test_resume.py.

Tiny model and synthetic data of tests/train_helpers.py; no test here loads a real model.
"""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from moa_jax.config import DataConfig, MoAConfig
from moa_jax.data.tasks import DataError
from moa_jax.names import BadNameError, PathEscapeError, check_name, inside
from tests.train_helpers import (ROOT, SyntheticSource, compile_cache, make_train_config,  # noqa: F401
                                 run_stage, tiny_cfg, tiny_moa)

BAD_NAMES = ["../../escaped_dom", "/abs/abs_dom", "a/b", "..", ".", ".hidden", "", "x" * 101]


# ---- names are names ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BAD_NAMES)
def test_the_name_rule_refuses_paths(name):
    with pytest.raises(BadNameError, match="only letters, digits and '._-\\+'"):
        check_name(name, "here")


def test_the_name_rule_keeps_ordinary_names():
    for name in ["chain_sum", "leg-counting", "v1.2", "c++", "Ärzte", "x" * 100]:
        assert check_name(name, "here") == name


@pytest.mark.parametrize("domain", ["../../escaped_dom", "/abs/abs_dom"])
def test_a_jsonl_domain_that_is_a_path_is_refused_with_file_line(tmp_path, domain):
    from moa_jax.data.sources import load_text_split
    folder = tmp_path / "data"
    folder.mkdir()
    lines = [{"prompt": f"q{i}", "response": f"a{i}", "domain": "ok"} for i in range(3)]
    lines[1]["domain"] = domain
    (folder / "mix.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataError, match=f"{folder / 'mix.jsonl'}:2: domain name '{domain}' is refused"):
        load_text_split(DataConfig(source=f"jsonl:{folder}", holdout_fraction=0.0), "train")


def test_add_domain_names_follow_the_same_rule(tmp_path):
    from moa_jax.data.new_domains import parse_new_domains
    with pytest.raises(DataError, match=r"new_domains '\.\.=basic_arithmetic': domain name '\.\.' is refused"):
        parse_new_domains(["..=basic_arithmetic"])
    path = tmp_path / "new.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "a", "domain": "../up"}) + "\n")
    with pytest.raises(DataError, match=f"{path}:1: domain name '../up' is refused"):
        parse_new_domains([f"jsonl:{path}"])


def test_peft_adapter_names_follow_the_same_rule(tmp_path):
    from moa_jax.peft_import import PeftImportError, read_peft_experts
    with pytest.raises(PeftImportError, match="domain name '../x' is refused"):
        read_peft_experts([str(tmp_path)], tiny_cfg(), names=["../x"])


@pytest.mark.parametrize("name", ["../../escaped_dom", "/abs/abs_dom"])
def test_export_refuses_an_expert_name_that_is_a_path_before_writing(tmp_path, name):
    from moa_jax.export import export_peft
    out = tmp_path / "out" / "peft"
    with pytest.raises(BadNameError, match=f"export_peft: expert name: domain name '{name}' is refused"):
        export_peft({}, tiny_cfg(), tiny_moa(), str(out), expert_names=["ok", name])
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped_dom").exists()


def test_inside_keeps_paths_in_their_folder_even_through_symlinks(tmp_path):
    folder, outside = tmp_path / "folder", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "link").symlink_to(outside)
    assert inside(str(folder), "a/b.npy") == str(folder / "a" / "b.npy")
    for bad in ["../x", "/etc/passwd", "link/x", ""]:
        with pytest.raises(PathEscapeError):
            inside(str(folder), bad)


def test_load_adapters_keeps_index_paths_inside_the_folder(tmp_path):
    """The adapters format of older versions: index.json naming one .npy file per array."""
    from moa_jax.train.checkpoint import load_adapters
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    np.save(adapters / "0000.npy", np.ones(2, np.float32))
    (adapters / "index.json").write_text(json.dumps({"layers/w": "0000.npy"}))
    (adapters / "config.json").write_text("{}")
    np.save(tmp_path / "planted.npy", np.zeros(2, np.float32))
    assert load_adapters(str(adapters))[0]["layers"]["w"].tolist() == [1.0, 1.0]
    (adapters / "index.json").write_text(json.dumps({"layers/w": "../planted.npy"}))
    with pytest.raises(PathEscapeError, match=r"index.json entry '../planted.npy' lies outside that folder"):
        load_adapters(str(adapters))


# ---- one run per work directory -------------------------------------------------------------------------------

def test_a_second_run_on_a_busy_workdir_exits_2_and_writes_nothing(tmp_path, capsys):
    """Another process holds the work directory (as a run does from its start to its end): experiments.run on it
    exits 2 with one line naming that pid, before writing anything, so the first run's results cannot change."""
    from experiments import run
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from moa_jax.run_lock import acquire; "
                               "acquire(sys.argv[1]); print('locked', flush=True); sys.stdin.read()", str(workdir)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(os.listdir(workdir))
        rc = run.main(["--exp=smoke", f"--workdir={workdir}", "--no_progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1] == (f"error: {workdir} is in use by another run (pid {holder.pid}); wait for "
                                       f"it to finish or use another --workdir"), err
        assert sorted(os.listdir(workdir)) == before == ["run.lock"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_on_exit(tmp_path, caplog):
    from moa_jax.run_lock import LOCK_NAME, run_lock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="moa_jax"):
        with pytest.raises(RuntimeError, match="the run failed"):
            with run_lock(str(workdir)):
                assert json.loads((workdir / LOCK_NAME).read_text())["pid"] == os.getpid()
                raise RuntimeError("the run failed")
    assert [r.getMessage() for r in caplog.records] == [
        f"{workdir}: taking over the lock of a run that is gone (pid {int(dead.stdout)}, killed or crashed)"]
    assert os.listdir(workdir) == []   # released on the way out of a failed run too


# ---- no hang: a failing background save stops the run ----------------------------------------------------------

def test_a_failing_background_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch, caplog):
    """Checkpoint 2's background commit fails (disk full). Once that thread has ended (step 3 waits for it, so the
    test does not depend on speed), the next step raises the error as one user-level line, before that step is
    logged; without the per-step check it would surface only at the step-4 checkpoint, after step 4 is logged."""
    from orbax.checkpoint._src.path import atomicity
    from moa_jax.train.checkpoint import CheckpointWriteError
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        if self._final_path.name == "2":
            raise OSError(28, "No space left on device")
        return await original(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)

    def on_log(step, row):
        if step == 3:   # let checkpoint 2's background threads end, however slow this machine is
            for t in threading.enumerate():
                while t.name in ("save_finalize", "async_save") and t.is_alive():   # (orbax's join re-raises)
                    time.sleep(0.01)

    logged = []
    tcfg = make_train_config(steps=4, checkpoint_every=2)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(CheckpointWriteError, match=r"writing checkpoint .*/checkpoints/2 failed \(\[Errno 28\] "
                                                       r"No space left on device\); free disk space"):
            run_stage(tmp_path / "run", tcfg, tiny_moa(), SyntheticSource(),
                      on_log=lambda s, r: (logged.append(s), on_log(s, r)))
    assert logged == [1, 2, 3]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]   # no orbax traceback before our line


# ---- values that cannot fit, refused up front -----------------------------------------------------------------

def test_an_oversized_rank_is_refused_before_any_expert_is_built(monkeypatch):
    from moa_jax import api
    from moa_jax.config import ConfigError
    from moa_jax.errors import check_rank_fits
    cfg = tiny_cfg()   # D=32, kv width 2 x 8 = 16: k_proj/v_proj are 32x16
    check_rank_fits(cfg, tiny_moa(rank=16))
    with pytest.raises(ConfigError, match=r"moa.rank=17 is larger than the narrowest adapted projection \(v_proj: "
                                          r"32x16 in this base model\); --set moa.rank=N with N <= 16"):
        check_rank_fits(cfg, tiny_moa(rank=17))
    # load_model checks as soon as the base model's widths are known (the base load itself is stubbed: seconds)
    monkeypatch.setattr(api, "_load_frozen", lambda *args: (cfg, {}, None))
    with pytest.raises(ConfigError, match=r"moa.rank=100000000000 is larger"):
        api.load_model("tiny-random", moa=MoAConfig(num_experts=2, rank=100_000_000_000))


# ---- the smaller contracts ------------------------------------------------------------------------------------

def test_a_data_folder_that_cannot_be_written_is_one_line_naming_the_setting(tmp_path):
    from moa_jax.data.moa_tasks import prepare
    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache folder would go")   # works as root too, unlike chmod
    with pytest.raises(DataError, match=rf"cannot build the embedded dataset into {blocker}/tfds \(.*\); set --set "
                                        r"data.data_dir=DIR \(or MOA_JAX_DATA_DIR\) to a writable folder"):
        prepare("tiny", str(blocker / "tfds"))


def test_a_run_killed_in_stage_1_is_unfinished_not_untrained(tmp_path):
    import moa_jax
    from moa_jax.run_artifacts import RunArtifactError
    workdir = tmp_path / "run"
    (workdir / "stage1" / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"workflow": "two_stage", "final_stage": "stage2"}))
    with pytest.raises(RunArtifactError, match=r"unfinished \(stage 'stage2' has not started .*\); re-run the same "
                                               r"experiments.run command to finish it"):
        moa_jax.load_run(str(workdir))
    from moa_jax.cli import generate
    assert generate.main(["--workdir", str(workdir), "--prompt", "hi"]) == 2
