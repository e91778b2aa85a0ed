"""Checkpoints with orbax `CheckpointManager`: trainable parameters (experts + routers), optimiser state, step,
RNG, the data position and the resolved config as JSON, keep-last-N, written atomically (orbax writes to a
temporary directory and renames it), so a killed run always leaves its last complete checkpoint.

Restore order for a stage (see train.py): resume from this stage's own checkpoints > initialise experts from the
previous stage's final adapters > fresh experts on the frozen base. A checkpoint whose config disagrees with the
current one on anything that changes the parameter tree (E, rank, targets, base model) is refused, naming the field.

Adapter artifacts (`save_adapters` / `load_adapters`): the trainable tree alone plus `config.json` beside it;
what stage 2 starts from and what export.py turns into PEFT adapters.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

# Config fields that must match between a checkpoint and the run restoring it: "section.field".
MUST_MATCH = ("model.source", "moa.num_experts", "moa.rank", "moa.targets", "moa.router_type",
              "moa.router_hidden", "model.hidden_size", "model.num_layers", "model.vocab_size")


class CheckpointMismatchError(ValueError):
    """The checkpoint was written with a configuration incompatible with the current one."""


def _lookup(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_compatible(saved: dict, current: dict, where: str) -> None:
    for key in MUST_MATCH:
        a, b = _lookup(saved, key), _lookup(current, key)
        if a is not None and b is not None and _canon(a) != _canon(b):
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
        """-> (state, meta). abstract_state carries the target shardings (ShapeDtypeStruct with .sharding)."""
        step = self.latest_step() if step is None else step
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        check_compatible(meta.get("config", {}), current_config, f"{self.directory}/{step}")
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
        raise FileNotFoundError(f"{directory}: no adapter artifact here (missing index.json)")
    with open(os.path.join(directory, "config.json")) as f:
        saved = json.load(f)
    if current_config is not None:
        check_compatible(saved, current_config, directory)
    with open(index_path) as f:
        index = json.load(f)
    flat = {tuple(k.split("/")): np.load(os.path.join(directory, v), allow_pickle=False) for k, v in index.items()}
    return traverse_util.unflatten_dict(flat), saved
