"""Resume hardening: a damaged newest checkpoint is skipped (one WARNING naming the step and the fault), whether the
damage makes a file unreadable or leaves it readable with other values (random bytes; a value changed under its
recorded digest: the digests catch it; a NaN written with matching digests: the finiteness check catches it); a run with no readable checkpoint stops with one
clear error; a NaN loss right after a resume names that checkpoint (a user error); a SIGKILL during a checkpoint
write resumes from the last complete checkpoint, every resume is logged, and metrics.jsonl holds every step once.

Tiny model and synthetic data of tests/train_helpers.py, with the resume configuration (dropout on, 2 micro-batches
per step, a checkpoint every step, the last 2 kept): 3 steps leave checkpoints 2 and 3.
"""
import gc
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

import jax
import numpy as np
import orbax.checkpoint as ocp

from moa_jax.config import MeshConfig
from moa_jax.errors import UserError
from moa_jax.sharding import make_mesh
from moa_jax.train.checkpoint import CheckpointCorruptError, StageCheckpointer
from moa_jax.train.loop import ResumedNonFiniteError, state_shardings
from moa_jax.train.step import make_optimizer
from tests.train_helpers import (ROOT, SyntheticSource, compile_cache, config_dict, finalized_steps,  # noqa: F401
                                 init_trees, max_abs_diff, resume_setup, run_stage, tiny_cfg, worker_env)

STEPS = 3
HANG_GUARD_S = 900   # kills a worker that hangs; generous, so a slow or busy machine never trips it


def metric_steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """An uninterrupted run: (its workdir, final trainable tree)."""
    workdir = tmp_path_factory.mktemp("clean")
    tcfg, moa, source = resume_setup(STEPS)
    final, history = run_stage(workdir, tcfg, moa, source)
    assert [h["step"] for h in history] == [1, 2, 3] and finalized_steps(workdir / "checkpoints") == [2, 3]
    return workdir, final


def _data_files(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    assert files, f"no array data files under {step_dir}/state"
    return sorted(files, key=os.path.getsize)


def delete_data_file(step_dir):
    os.remove(_data_files(step_dir)[-1])


def delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "meta", "metadata"))


def truncate_data_file(step_dir):
    path = _data_files(step_dir)[-1]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def random_bytes_in_data_file(step_dir):
    """256 random bytes a quarter into the largest data file (issue 24's reproduction). Where they land depends on
    the order orbax wrote the arrays in: a zstd frame header (a read error) or a frame's payload (it decodes to
    other values, which only the digest check sees)."""
    path = _data_files(step_dir)[-1]
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 4)
        f.write(np.random.default_rng(2).integers(0, 256, 256, dtype=np.uint8).tobytes())


def _rewrite_checkpoint(step_dir, change, *, keep_digests: bool):
    """Restore the checkpoint, apply `change` to the first Adam first-moment leaf, and write it back under the same
    step, with its old digests (bit rot that still decodes) or with new ones (a bad value written as such)."""
    tcfg, moa, _ = resume_setup(STEPS)
    cfg = tiny_cfg()
    trainable = init_trees(cfg, moa)[1]
    abstract, _ = state_shardings(make_mesh(MeshConfig(data=1, expert=1), jax.devices()[:1]),
                                  make_optimizer(tcfg, trainable), trainable)
    ckpt = StageCheckpointer(os.path.dirname(step_dir))
    step = int(os.path.basename(step_dir))
    state, meta = ckpt.restore(abstract, config_dict(cfg, moa, tcfg), step=step)
    changed = []

    def apply(path, leaf):
        if not changed and ".mu[" in jax.tree_util.keystr(path):
            changed.append(path)
            return change(leaf)
        return leaf

    state = state.replace(opt_state=jax.tree_util.tree_map_with_path(apply, state.opt_state))
    assert changed
    ckpt.manager.delete(step)
    if keep_digests:
        ckpt.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)))
    else:
        ckpt.save(step, state, {"config": meta["config"]})
    ckpt.close()


def changed_value_under_its_digest(step_dir):
    _rewrite_checkpoint(step_dir, lambda leaf: leaf + 1.0, keep_digests=True)


def nan_in_a_moment(step_dir):
    _rewrite_checkpoint(step_dir, lambda leaf: leaf.at[(0,) * leaf.ndim].set(np.nan), keep_digests=False)


DAMAGE = {"data_file_deleted": (delete_data_file, r"Error reading|not found|NOT_FOUND"),
          "metadata_deleted": (delete_metadata, r"meta/metadata not found"),
          "data_file_truncated": (truncate_data_file, r"Error reading|OUT_OF_RANGE|DATA_LOSS"),
          "random_bytes": (random_bytes_in_data_file, r"differ from their digest|Error reading"),
          "changed_value_under_its_digest": (changed_value_under_its_digest,
                                             r"1 array\(s\) differ from their digest, e\.g\. \.opt_state.*\.mu\["),
          "nan_in_a_moment": (nan_in_a_moment, r"NaN/inf in \.opt_state.*\.mu\[")}


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")   # e.g. "Event loop is closed"
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, clean_run, damage, caplog, capfd):
    """The newest checkpoint (step 3) loses a data file / its metadata / half a file: the run warns once, naming
    step 3 and the fault, resumes from step 2, retrains step 3 and ends equal to the uninterrupted run."""
    clean_dir, clean_final = clean_run
    workdir = tmp_path / "run"
    shutil.copytree(clean_dir, workdir)
    damage_fn, reason = DAMAGE[damage]
    damage_fn(str(workdir / "checkpoints" / "3"))
    tcfg, moa, source = resume_setup(STEPS)
    with caplog.at_level(logging.INFO, logger="moa_jax"):
        final, history = run_stage(workdir, tcfg, moa, source)
    gc.collect()   # the failed restore's orphaned reads are collected here: they must print nothing
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"{workdir / 'checkpoints'}/3 is damaged" in warnings[0] and "resuming from step 2" in warnings[0]
    assert len(warnings[0]) < 600 and "\n" not in warnings[0]
    assert re.search(reason, warnings[0]), warnings[0]
    assert f"resuming train from step 2 of 3 (checkpoint {workdir / 'checkpoints' / '2'})" in caplog.text
    assert "Traceback" not in capfd.readouterr().err
    assert [h["step"] for h in history] == [3]
    assert max_abs_diff(final, clean_final) < 1e-6
    assert metric_steps(workdir) == [1, 2, 3] and finalized_steps(workdir / "checkpoints") == [2, 3]


def test_no_readable_checkpoint_is_one_clear_error(tmp_path, clean_run):
    workdir = tmp_path / "run"
    shutil.copytree(clean_run[0], workdir)
    delete_metadata(str(workdir / "checkpoints" / "3"))
    delete_data_file(str(workdir / "checkpoints" / "2"))
    tcfg, moa, source = resume_setup(STEPS)
    with pytest.raises(CheckpointCorruptError, match=r"no readable checkpoint \(step 3: .*; step 2: .*\); delete "
                                                     r"that directory to train this stage from the start") as err:
        run_stage(workdir, tcfg, moa, source)
    assert "\n" not in str(err.value)


def test_a_nan_loss_right_after_a_resume_names_the_checkpoint(tmp_path, clean_run):
    """Finite garbage restores (its digests match); the first update after the resume is NaN. The error is a user
    error naming the checkpoint resumed from and what to do, not advice to lower the learning rate."""
    workdir = tmp_path / "run"
    shutil.copytree(clean_run[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "3")   # resume from 2: the clean run's program, compiled already
    tcfg, moa, _ = resume_setup(STEPS)
    bad = SyntheticSource(batch_size=4, bad_from=2 * tcfg.grad_accum)   # NaN from the first batch after step 2
    with pytest.raises(ResumedNonFiniteError) as err:
        run_stage(workdir, tcfg, moa, bad)
    assert isinstance(err.value, UserError)
    ckpt = workdir / "checkpoints" / "2"
    assert f"right after resuming from checkpoint {ckpt} (up to step 3)" in str(err.value)
    assert f"delete {ckpt} and rerun the same command" in str(err.value) and "learning rate" not in str(err.value)


def test_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path, compile_cache, clean_run,
                                                                            caplog):
    """The worker is SIGKILLed while orbax writes checkpoint 3 (its files are in the temporary directory, not yet
    committed; the worker has already logged steps 3 and 4). The same command then resumes from checkpoint 2, logs
    it, trains steps 3-4 once more and ends equal to an uninterrupted run; metrics.jsonl has each step once."""
    steps, killed = 4, tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tests._train_worker", str(killed), str(steps), "0", "3"],
                            cwd=ROOT, env=worker_env(compile_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    watchdog = threading.Timer(HANG_GUARD_S, proc.kill)   # a hung worker ends the loop below: no time assertion
    watchdog.start()
    try:
        for line in proc.stdout:   # blocks line by line; the worker prints the pause line, then sleeps
            lines.append(line)
            if line.startswith("pausing in the write of checkpoint 3"):
                break
        assert lines and lines[-1].startswith("pausing"), "".join(lines)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    assert finalized_steps(killed / "checkpoints") == [1, 2], os.listdir(killed / "checkpoints")
    assert any(name.startswith("3.") for name in os.listdir(killed / "checkpoints"))  # the interrupted write
    logged_before = metric_steps(killed)
    assert 3 in logged_before, logged_before   # the rows of steps past the last complete checkpoint exist

    tcfg, moa, source = resume_setup(steps)
    with caplog.at_level(logging.INFO, logger="moa_jax"):
        resumed, history = run_stage(killed, tcfg, moa, source)
    assert f"resuming train from step 2 of 4 (checkpoint {killed / 'checkpoints' / '2'})" in caplog.text
    assert [h["step"] for h in history] == [3, 4]
    assert metric_steps(killed) == [1, 2, 3, 4]
    clean, _ = run_stage(tmp_path / "clean", tcfg, moa, source)
    assert max_abs_diff(resumed, clean) < 1e-6


def test_metrics_rows_past_the_resume_step_are_dropped_even_a_torn_one(tmp_path):
    from moa_jax.train.metrics_log import MetricsLogger
    logger = MetricsLogger(str(tmp_path))
    for step in range(1, 6):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')   # a row cut off by a SIGKILL mid-write
    MetricsLogger(str(tmp_path), resume_step=3).close()
    assert metric_steps(tmp_path) == [1, 2, 3]
