"""Checkpoints with orbax `CheckpointManager`: trainable parameters (experts + routers), optimiser state, step,
RNG, the data position and the resolved config as JSON, keep-last-N, written atomically (orbax writes to a
temporary directory and renames it), so a killed run always leaves its last complete checkpoint.

Restore order for a stage (see train.py): resume from this stage's own checkpoints > initialise experts from the
previous stage's final adapters > fresh experts on the frozen base. A checkpoint whose config disagrees with the
current one on anything that changes the parameter tree or the function the adapters compute (MUST_MATCH: base
model, E, rank, alpha, rsLoRA, targets, dispatch, router) is refused, naming the field.

A damaged checkpoint (a file missing, truncated or corrupt: a preempted or disk-full write outside orbax's atomic
rename) is skipped: restore tries the newest step first, then older ones, logs one WARNING line per broken step
(which step, what was wrong) and deletes it, so training resumes from the newest intact step and rewrites the rest.
With no intact checkpoint left, a CheckpointCorruptError (a UserError: exit 2 from the CLIs) says what to do.

Adapter artifacts (`save_adapters` / `load_adapters`): the trainable tree alone plus `config.json` beside it;
what stage 2 starts from and what export.py turns into PEFT adapters.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from moa_jax.errors import UserError

log = logging.getLogger("moa_jax")

# MoAConfig fields that change the function trained adapters compute. `decision` (an inference policy), `dropout`
# (training only) and `adapter_dtype` (storage) may differ; top_k counts only with token_topk dispatch and
# router_hidden only with the mlp router (`_applies`).
MOA_FUNCTION_FIELDS = ("num_experts", "rank", "alpha", "use_rslora", "targets", "dispatch", "top_k", "router_type",
                       "router_hidden")
# The base-model fields adapters are tied to (their shapes).
MODEL_SHAPE_FIELDS = ("hidden_size", "num_layers", "vocab_size")
# Config fields that must match between a checkpoint and the run restoring it (resume) or the model loading it:
# "section.field".
MUST_MATCH = (("model.source",) + tuple(f"model.{f}" for f in MODEL_SHAPE_FIELDS)
              + tuple(f"moa.{f}" for f in MOA_FUNCTION_FIELDS))


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint was written with a configuration incompatible with the current one."""


class CheckpointCorruptError(UserError, ValueError):
    """No checkpoint of a stage can be read (every step is missing files or corrupt)."""


class AdapterNotFoundError(UserError, FileNotFoundError):
    """A directory that should hold adapters (index.json + config.json + .npy files) does not."""


def lookup_key(cfg: dict, dotted: str):
    """cfg['a']['b'] for 'a.b'; None where the path does not exist."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _applies(key: str, cfg: dict) -> bool:
    if key == "moa.top_k":
        return lookup_key(cfg, "moa.dispatch") == "token_topk"
    if key == "moa.router_hidden":
        return lookup_key(cfg, "moa.router_type") == "mlp"
    return True


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

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)))

    def restore(self, abstract_state: Any, current_config: dict, step: Optional[int] = None):
        """-> (state, meta) of `step`, or of the newest intact step when `step` is None (broken newer steps are
        reported and deleted). abstract_state carries the target shardings (ShapeDtypeStruct with .sharding)."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        broken: list[tuple[int, str]] = []
        for s in steps:
            try:
                with _quiet_orbax():
                    meta = self.manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                    check_compatible(meta.get("config", {}), current_config, f"{self.directory}/{s}")
                    state = self.manager.restore(
                        s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
            except CheckpointMismatchError:
                raise   # readable, but from another configuration: not a damaged file
            except Exception as e:  # orbax/tensorstore raise bare Exception, ValueError, OSError for damaged files
                _silence_orphaned_reads()
                broken.append((s, _short_reason(e)))
                continue
            for b, reason in broken:
                log.warning("checkpoint %s/%d is unreadable (%s): deleted it, resuming from step %d",
                            self.directory, b, reason, s)
                self.manager.delete(b)
            return state, meta
        raise CheckpointCorruptError(
            f"{self.directory}: no readable checkpoint (" + "; ".join(f"step {b}: {r}" for b, r in broken)
            + "); delete that directory to train this stage from the start")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
    lines for one missing file). Drop exactly those; any other error still prints."""
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
    logging.getLogger("asyncio").addFilter(_DropOrphanedReads())


def save_adapters(directory: str, trainable: Any, config: dict) -> None:
    """Write the trainable tree (as .npy files per leaf, no pickle) and config.json, atomically."""
    tmp = directory.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(trainable))
    index = {}
    for i, (k, v) in enumerate(sorted(flat.items())):
        fname = f"{i:04d}.npy"
        np.save(os.path.join(tmp, fname), np.asarray(v), allow_pickle=False)
        index["/".join(k)] = fname
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=1, default=str)
    if os.path.exists(directory):
        import shutil
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def load_adapters(directory: str, current_config: Optional[dict] = None) -> tuple[dict, dict]:
    """-> (trainable tree of numpy arrays, saved config). Refuses incompatible configs, naming the field."""
    index_path = os.path.join(directory, "index.json")
    if not os.path.exists(index_path):
        raise AdapterNotFoundError(f"{directory}: no adapter artifact here (missing index.json); point at the "
                                   f"adapters/ folder of a finished stage")
    with open(os.path.join(directory, "config.json")) as f:
        saved = json.load(f)
    if current_config is not None:
        check_compatible(saved, current_config, directory)
    with open(index_path) as f:
        index = json.load(f)
    flat = {tuple(k.split("/")): np.load(os.path.join(directory, v), allow_pickle=False) for k, v in index.items()}
    return traverse_util.unflatten_dict(flat), saved
