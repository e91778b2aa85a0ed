"""Checkpoints with orbax `CheckpointManager`: trainable parameters (experts + routers), optimiser state, step,
RNG, the data position and the resolved config as JSON, keep-last-N, written atomically (orbax writes to a
temporary directory and renames it), so a killed run always leaves its last complete checkpoint.

Restore order for a stage (see train.py): resume from this stage's own checkpoints > initialise experts from the
previous stage's final adapters > fresh experts on the frozen base. A checkpoint whose config disagrees with the
current one on anything that changes the parameter tree or the function the adapters compute (MUST_MATCH: base
model, E, rank, alpha, rsLoRA, targets, dispatch, router) is refused, naming the field.

A damaged checkpoint (a file missing, truncated or corrupt: a preempted or disk-full write outside orbax's atomic
rename, a bad disk) is skipped: restore tries the newest step first, then older ones, logs one WARNING line per
damaged step (which step, what was wrong) and deletes it, so training resumes from the newest intact step and
rewrites the rest. Corruption that leaves the bytes readable is caught too: each checkpoint's meta item records a
digest of every array of the state (`state_digests`), and restore recomputes them; a mismatch, or a NaN/inf in the
restored parameters or optimiser state, makes the step damaged. With no intact checkpoint left, a
CheckpointCorruptError (a UserError: exit 2 from the CLIs) says what to do.

Saves are asynchronous (orbax writes in a background thread). `check_saves` surfaces a finished background save's
error without waiting, so the loop stops at the next step instead of at the next checkpoint (or never); an OSError
(disk full, permissions, the folder changed under us) becomes a CheckpointWriteError (a UserError).

Adapter artifacts (`save_adapters` / `load_adapters`): the trainable tree alone as `adapters.safetensors` (flat
keys "layers/attn/q_proj/lora_a", ..., each array's dtype kept, bfloat16 included, and each array's digest in the
file's metadata, checked on reading) plus `config.json` beside it, written atomically; what stage 2 starts from,
what export.py turns into PEFT adapters and what `MoAModel.save_pretrained` writes. Adapters written by older
versions (`index.json` naming one `.npy` file per array) still load; every file of one lies inside its folder
(moa_jax/names.py `inside`), whatever index.json says.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Any, Optional

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from moa_jax.config import stage_conditions, stage_keys
from moa_jax.errors import UserError
from moa_jax.names import inside
from moa_jax.run_artifacts import BEST_ADAPTERS, CONFIG_FILE, LEGACY_INDEX, WEIGHTS_FILE, adapter_weights
from moa_jax.sharding import gather_to_host

log = logging.getLogger("moa_jax")

# Saved-config keys that must match between a checkpoint and the run restoring it (resume) or the model loading it:
# the fields marked "function" (the base model, the data source, what the adapters compute) and "shape" (the base
# model's shapes the adapters are tied to) in moa_jax/config.py. A "function" field with `only_if` counts only
# under its condition (top_k with token_topk dispatch).
MUST_MATCH = stage_keys("function") + stage_keys("shape")


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint was written with a configuration incompatible with the current one."""


class CheckpointCorruptError(UserError, ValueError):
    """No checkpoint of a stage can be read (every step is missing files or corrupt)."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, permissions, the folder changed under the run)."""


class _DamagedStep(Exception):
    """A checkpoint step restored, but its arrays do not match their digests or hold NaN/inf."""


class AdapterNotFoundError(UserError, FileNotFoundError):
    """A directory that should hold adapters (config.json + adapters.safetensors, or a legacy index.json) does not."""


class AdapterCorruptError(UserError, ValueError):
    """An adapters file cannot be read, or its arrays differ from the digests it records."""


def lookup_key(cfg: dict, dotted: str):
    """cfg['a']['b'] for 'a.b'; None where the path does not exist."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _applies(key: str, cfg: dict) -> bool:
    condition = stage_conditions().get(key)
    return condition is None or lookup_key(cfg, condition[0]) == condition[1]


def config_mismatches(saved: dict, current: dict, keys=MUST_MATCH) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for each of `keys` recorded in both configs with different values."""
    out = []
    for key in keys:
        a, b = lookup_key(saved, key), lookup_key(current, key)
        if (a is not None and b is not None and _applies(key, saved) and _applies(key, current)
                and _canon(a) != _canon(b)):
            out.append((key, a, b))
    return out


def check_compatible(saved: dict, current: dict, where: str) -> None:
    for key, a, b in config_mismatches(saved, current)[:1]:
        raise CheckpointMismatchError(
            f"{where}: checkpoint has {key}={a!r} but the current config has {key}={b!r}; "
            f"use a new --workdir, or set {key} to match the checkpoint")


def _canon(v):
    return tuple(v) if isinstance(v, list) else v


class StageCheckpointer:
    """Orbax manager for one training stage's directory."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"))
        self._pending: Optional[int] = None   # the step whose background save has not been checked yet
        _quiet_failed_saves()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start writing `step` (the device-to-host copy happens here; the files are written in the background)."""
        meta = {**meta, "digests": state_digests(gather_to_host(state))}
        with self._save_errors(step):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)))
        self._pending = step

    def check_saves(self) -> None:
        """Raise the error of a background save that has finished (never waits for one still running)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    @contextlib.contextmanager
    def _save_errors(self, step: int):
        try:
            yield
        except OSError as e:
            raise CheckpointWriteError(
                f"writing checkpoint {self.directory}/{step} failed ({_short_reason(e)}); free disk space or fix "
                f"the folder (is another process writing to it?), then rerun the same command: it resumes from "
                f"the last complete checkpoint") from e

    def restore(self, abstract_state: Any, current_config: dict, step: Optional[int] = None):
        """-> (state, meta) of `step`, or of the newest intact step when `step` is None (broken newer steps are
        reported and deleted). abstract_state carries the target shardings (ShapeDtypeStruct with .sharding)."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        broken: list[tuple[int, str]] = []
        _silence_orphaned_reads()   # before the first read: orphaned reads can call back before `except` runs
        for s in steps:
            try:
                with _quiet_orbax():
                    meta = self.manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                    check_compatible(meta.get("config", {}), current_config, f"{self.directory}/{s}")
                    state = self.manager.restore(
                        s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
                check_state(gather_to_host(state), meta.get("digests"))
            except CheckpointMismatchError:
                raise   # readable, but from another configuration: not a damaged file
            except Exception as e:  # orbax/tensorstore raise bare Exception, ValueError, OSError for damaged files
                broken.append((s, _short_reason(e)))
                continue
            for b, reason in broken:
                log.warning("checkpoint %s/%d is damaged (%s): deleted it, resuming from step %d",
                            self.directory, b, reason, s)
                self.manager.delete(b)
            return state, meta
        raise CheckpointCorruptError(
            f"{self.directory}: no readable checkpoint (" + "; ".join(f"step {b}: {r}" for b, r in broken)
            + "); delete that directory to train this stage from the start")

    def wait(self) -> None:
        """Wait for the background save; raise its error (a CheckpointWriteError for an OSError)."""
        step, self._pending = self._pending, None
        with self._save_errors(step):
            self.manager.wait_until_finished()
            self.manager.check_for_errors()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def state_digests(host_state: Any) -> dict[str, str]:
    """{leaf path: digest of its dtype, shape and bytes} of a host (numpy) state tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(host_state)[0]:
        a = np.ascontiguousarray(leaf)
        h = hashlib.blake2b(f"{a.dtype.str}{a.shape}".encode(), digest_size=16)
        h.update(a.tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def check_state(host_state: Any, digests: Optional[dict]) -> None:
    """Raise _DamagedStep unless every array matches its recorded digest (checkpoints written before digests
    existed have none) and every float array is finite (a checkpoint is only written from a finite state)."""
    if digests is not None:
        got = state_digests(host_state)
        bad = sorted(k for k in set(got) | set(digests) if got.get(k) != digests.get(k))
        if bad:
            raise _DamagedStep(f"{len(bad)} array(s) differ from their digest, e.g. {bad[0]}")
    for path, leaf in jax.tree_util.tree_flatten_with_path(host_state)[0]:
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise _DamagedStep(f"NaN/inf in {jax.tree_util.keystr(path)}")


def _short_reason(e: BaseException) -> str:
    """The innermost cause's first line (tensorstore's own message), without the multi-page spec dump."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).split("See full TensorStore details")[0].strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs a failed restore at ERROR with the tensorstore spec (hundreds of lines); our one WARNING says it."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _orphaned_read_error(exc: BaseException) -> bool:
    text = str(exc)
    return text.startswith("Encountered error while reading array index") or text == "Event loop is closed"


class _DropOrphanedReads(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[1] is not None and _orphaned_read_error(record.exc_info[1]))


def _silence_orphaned_reads() -> None:
    """After a failed restore orbax leaves the other arrays' reads pending; when they finish or are collected,
    asyncio, tensorstore's callbacks and the garbage collector each print their error as a traceback (hundreds of
    lines for one missing file). The `RuntimeError: Event loop is closed` one is such a read completing after
    orbax closed the event loop its restore ran in; orbax gives no handle to wait for them, so they are dropped
    here: exactly those errors, any other still prints. Installed before the first read, since a read can fail
    on tensorstore's thread before the failed restore reaches our `except`."""
    if getattr(sys.unraisablehook, "_moa_quiet", False):
        return
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(u):
        if not _orphaned_read_error(u.exc_value):
            previous_unraisable(u)

    def excepthook(kind, value, tb):
        if not _orphaned_read_error(value):
            previous_except(kind, value, tb)

    unraisable._moa_quiet = True
    sys.unraisablehook, sys.excepthook = unraisable, excepthook
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropOrphanedReads) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropOrphanedReads())


class _DropFailedSaveLogs(logging.Filter):
    """Orbax logs a failed background save at ERROR with its traceback, from two threads; the run then stops with
    that error as one CheckpointWriteError line, so an OSError's copies are dropped (any other error still logs)."""

    MESSAGES = ("in background save thread", "Save Finalize thread", "Checkpointer failed")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, OSError) and any(m in record.getMessage() for m in self.MESSAGES))


def _quiet_failed_saves() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropFailedSaveLogs) for f in logger.filters):
        logger.addFilter(_DropFailedSaveLogs())


def save_adapters(directory: str, trainable: Any, config: dict) -> None:
    """Write the trainable tree as one safetensors file (WEIGHTS_FILE, keys "layers/attn/q_proj/lora_a", ..., every
    dtype kept, bfloat16 included; the digest of each array in its metadata) and config.json, atomically: into
    `<directory>.tmp`, then renamed over `directory`."""
    from safetensors.numpy import save_file
    tmp = directory.rstrip("/") + ".tmp"
    if os.path.exists(tmp):   # a save killed before its rename
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    flat = {"/".join(k): np.ascontiguousarray(v)
            for k, v in sorted(traverse_util.flatten_dict(jax.device_get(trainable)).items())}
    save_file(flat, inside(tmp, WEIGHTS_FILE), metadata={"digests": json.dumps(state_digests(flat))})
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=1, default=str)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def save_best(stage_dir: str, trainable: Any, config: dict, record: dict) -> None:
    """The adapters with the lowest validation loss so far, as save_adapters writes them, into
    <stage_dir>/best_adapters; `record` ({"step", "loss", "metrics"}) goes into its config.json as "validation"."""
    save_adapters(os.path.join(stage_dir, BEST_ADAPTERS), trainable, {**config, "validation": record})


def read_best(stage_dir: str) -> Optional[dict]:
    """The validation record of <stage_dir>/best_adapters ({"step", "loss", "metrics"}); None without one."""
    path = os.path.join(stage_dir, BEST_ADAPTERS, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("validation")


def load_adapters(directory: str, current_config: Optional[dict] = None) -> tuple[dict, dict]:
    """-> (trainable tree of numpy arrays, saved config). Refuses incompatible configs, naming the field. Reads
    WEIGHTS_FILE, or the legacy LEGACY_INDEX + .npy files of older versions (every file inside `directory`)."""
    weights = adapter_weights(directory)
    if weights is None:
        raise AdapterNotFoundError(f"{directory}: no adapter artifact here (missing {WEIGHTS_FILE}); point at the "
                                   f"adapters/ folder of a finished stage")
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        saved = json.load(f)
    if current_config is not None:
        check_compatible(saved, current_config, directory)
    if weights == WEIGHTS_FILE:
        flat = _read_weights(inside(directory, WEIGHTS_FILE))
    else:
        with open(os.path.join(directory, LEGACY_INDEX)) as f:
            index = json.load(f)
        flat = {k: _legacy_array(np.load(inside(directory, v, f"{LEGACY_INDEX} entry"), allow_pickle=False))
                for k, v in index.items()}
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()}), saved


def _legacy_array(a: np.ndarray) -> np.ndarray:
    """np.save wrote bfloat16 (ml_dtypes) as raw 2-byte records (dtype V2); they are bfloat16 again here."""
    return a.view(ml_dtypes.bfloat16) if a.dtype == np.dtype("V2") else a


def _read_weights(path: str) -> dict[str, np.ndarray]:
    """{"layers/attn/q_proj/lora_a": array} of a WEIGHTS_FILE, checked against the digests it records."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="numpy") as f:
            digests = json.loads((f.metadata() or {}).get("digests", "null"))
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterCorruptError(f"{path} is damaged ({_short_reason(e)}); re-run the stage that wrote it") from None
    if digests is not None:
        got = state_digests(flat)
        bad = sorted(k for k in set(got) | set(digests) if got.get(k) != digests.get(k))
        if bad:
            raise AdapterCorruptError(f"{path} is damaged ({len(bad)} array(s) differ from their digest, e.g. "
                                      f"{bad[0]}); re-run the stage that wrote it")
    return flat
