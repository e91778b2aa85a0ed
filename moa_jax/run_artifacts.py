"""A finished run's work directory read back for inference: which stage's adapters, on which base model, with which
MoA config, expert names, system prompt and prompt format. `moa_jax.load_run`, `load_model(adapters=DIR)` and
`python -m moa_jax.cli.generate` read runs through this module only.

    workdir/config.json                          the run's ExperimentConfig (its `data` settings)
    workdir/<stage>/adapters/config.json         the stage's resolved config: model (source, dtype, quantize, sizes),
                                                 moa, data, domains (expert order), stage
    workdir/<stage>/adapters/adapters.safetensors  the trained experts and routers (train/checkpoint.py; older
                                                 runs: index.json + one .npy file per array, still read)
    workdir/<stage>/best_adapters/               the same for the step of lowest validation loss (eval_every)
    workdir/results.json                         "stages": where each stage's adapters are (reuse_from: another run)

Stages: stage1 (experts, untrained routers), stage2 (the MoA model), mixed_lora (one LoRA on all domains, E=1),
moe_lora (token-level top-k), variants/<NAME>/stage2 or variants/<NAME>/moe_lora (ablations): whichever the run
trained. Expert names are the run's domains in expert order; the single expert of mixed_lora is named after its
stage.

Shape glossary: E experts.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Optional

from moa_jax.config import ConfigError, DataConfig, MoAConfig
from moa_jax.config_fields import absent_values
from moa_jax.errors import UserError

# An adapters folder (train/checkpoint.py save_adapters): config.json + the weights as WEIGHTS_FILE, or, as written
# by older versions, LEGACY_INDEX naming one .npy file per array.
CONFIG_FILE, WEIGHTS_FILE, LEGACY_INDEX = "config.json", "adapters.safetensors", "index.json"
# Beside a stage's adapters/: the adapters of its lowest validation loss (moa_jax/train/validation.py)
BEST_ADAPTERS = "best_adapters"


class RunArtifactError(UserError, FileNotFoundError):
    """A work directory (or an adapters directory) does not hold what loading a trained model needs."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a run recorded about one stage (read_run)."""
    workdir: str
    stage: str
    adapters: str                 # the stage's adapters directory
    source: str                   # the base model (the run's, or the source= override)
    moa: MoAConfig
    domains: tuple                # expert names, expert e <-> domains[e]
    system_prompt: Optional[str]  # the system message training put before each prompt (None: none)
    prompt_format: Optional[str]  # "chat" | "plain": how training turned prompts into text (data/prompt_format.py)
    dtype: Optional[str]          # the compute dtype the stage trained in
    quantize: str                 # "none" | "int8": how the frozen base was stored in training
    saved: dict                   # the adapters' config.json


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise RunArtifactError(f"{path}: not valid JSON ({e}); the file is damaged, re-run the stage that wrote "
                               f"it") from None


def adapter_moa(saved: dict, where: str) -> Optional[MoAConfig]:
    """The MoAConfig recorded with adapters (None when the artifact records none)."""
    if "moa" not in saved:
        return None
    try:
        return MoAConfig(**saved["moa"])
    except (TypeError, ConfigError) as e:
        raise RunArtifactError(f"{where}/config.json: its 'moa' entry is not a valid MoAConfig ({e})") from None


def expert_names(saved: dict, num_experts: int) -> tuple:
    """The run's domains in expert order; the one expert of a mixed run is named after its stage; () if unknown."""
    domains = tuple(saved.get("domains") or ())
    if len(domains) == num_experts:
        return domains
    if num_experts == 1 and domains:
        return (saved.get("stage") or "mixed_lora",)
    return ()


def training_system_prompt(data: Optional[dict]) -> Optional[str]:
    """The system prompt a run trained with, from its recorded `data` settings (DataConfig as a dict)."""
    from moa_jax.data.sources import resolve_system_prompt   # deferred: the data package imports its sources
    if not data:
        return None
    return resolve_system_prompt(data.get("system_prompt", "auto"), data.get("source", "moa_tasks"))


def training_prompt_format(data: Optional[dict]) -> Optional[str]:
    """The prompt format a run trained with, from its recorded `data` settings: the resolved "chat" or "plain" a
    stage records; a config saved before the field existed ran with chat; None when no data settings are recorded
    (then the tokenizer decides: chat iff it has a template)."""
    if not data:
        return None
    return data.get("prompt_format", absent_values(DataConfig)["prompt_format"])


def adapter_weights(directory: str) -> Optional[str]:
    """The file holding an adapters folder's arrays (WEIGHTS_FILE, or a legacy LEGACY_INDEX); None if neither."""
    for name in (WEIGHTS_FILE, LEGACY_INDEX):
        if os.path.exists(os.path.join(directory, name)):
            return name
    return None


def has_adapters(directory: str) -> bool:
    return adapter_weights(directory) is not None


def check_adapter_dir(directory: str, what: str) -> None:
    missing = ([] if os.path.exists(os.path.join(directory, CONFIG_FILE)) else [CONFIG_FILE]) + \
              ([] if has_adapters(directory) else [WEIGHTS_FILE])
    if missing:
        raise RunArtifactError(f"{directory}: no adapter artifact here (missing {', '.join(missing)}); {what}")


def available_stages(workdir: str) -> list[str]:
    """The stages of `workdir` whose adapters can be loaded (its own and, from results.json, reused ones)."""
    found = {os.path.relpath(os.path.dirname(p), workdir)
             for pattern in ("*/adapters", "variants/*/*/adapters")
             for p in glob.glob(os.path.join(glob.escape(workdir), pattern)) if has_adapters(p)}
    results = os.path.join(workdir, "results.json")
    if os.path.exists(results):
        for stage, directory in read_json(results).get("stages", {}).items():
            if has_adapters(os.path.join(directory, "adapters")):
                found.add(stage)
    return sorted(found)


def stage_adapters(workdir: str, stage: str) -> str:
    """The adapters directory of `stage` in the run `workdir` (or in the run it reused that stage from)."""
    if not os.path.isdir(workdir):
        raise RunArtifactError(f"{workdir}: no such directory; pass the --workdir of a `python -m experiments.run`")
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise RunArtifactError(f"{workdir}: not a run directory (no config.json); pass the --workdir of "
                               f"`python -m experiments.run`")
    stage_dir = os.path.join(workdir, stage)
    results = os.path.join(workdir, "results.json")
    if not os.path.isdir(os.path.join(stage_dir, "adapters")) and os.path.exists(results):
        stage_dir = read_json(results).get("stages", {}).get(stage, stage_dir)   # reuse_from: another run's
    adapters = os.path.join(stage_dir, "adapters")
    if has_adapters(adapters):
        check_adapter_dir(adapters, "the stage's artifact is incomplete; re-run the experiment command")
        return adapters
    stages = available_stages(workdir)
    if os.path.isdir(os.path.join(stage_dir, "checkpoints")):
        raise RunArtifactError(f"{workdir}: stage {stage!r} has not finished (checkpoints but no adapters at "
                               f"{adapters}); re-run the same experiments.run command to finish it, or load one "
                               f"of the finished stages {stages}")
    if not os.path.exists(results):   # killed before this stage started
        raise RunArtifactError(f"{workdir}: unfinished (stage {stage!r} has not started and there is no "
                               f"results.json); re-run the same experiments.run command to finish it, or load one "
                               f"of the finished stages {stages}")
    raise RunArtifactError(f"{workdir}: no adapters for stage {stage!r} (this run did not train it); stages "
                           f"with adapters here: {stages}")


def final_stage(workdir: str) -> str:
    """The stage holding the final model of the run in `workdir`, as its workflow recorded it in config.json
    ("final_stage"); stage2 for runs saved before workflows recorded it."""
    path = os.path.join(workdir, "config.json")
    return (read_json(path).get("final_stage") if os.path.exists(path) else None) or "stage2"


def read_run(workdir: str, stage: Optional[str] = None, source: Optional[str] = None, best: bool = False) -> RunInfo:
    """Everything needed to rebuild a stage's model (default: the run's final model; `best`: the stage's adapters
    of lowest validation loss instead of its final ones), checked (the base model too) before anything loads."""
    from moa_jax.loading.base import check_base_model
    from moa_jax.loading.resolve import ModelSourceError
    workdir = os.fspath(workdir)
    stage = stage or final_stage(workdir)
    adapters = stage_adapters(workdir, stage)
    if best:
        adapters = os.path.join(os.path.dirname(adapters), BEST_ADAPTERS)
        check_adapter_dir(adapters, f"stage {stage!r} kept no best adapters: it trained without validation "
                          f"({stage}.eval_every=0); load its final adapters (best=False)")
    where = os.path.join(adapters, "config.json")
    saved = read_json(where)
    missing = [key for key in ("model", "moa", "domains") if key not in saved]
    if missing or "source" not in saved["model"]:
        raise RunArtifactError(f"{where}: records no {missing or ['model.source']} (written by an older "
                               f"version); load it with moa_jax.load_model(SOURCE, moa=MoAConfig(...), "
                               f"adapters={adapters!r})")
    data = saved.get("data") or read_json(os.path.join(workdir, "config.json")).get("data")
    if data is None:
        raise RunArtifactError(f"neither {where} nor {workdir}/config.json records the run's data settings "
                               f"(needed for its system prompt); pass system_prompt= to generate()")
    moa = adapter_moa(saved, adapters)
    base = source or saved["model"]["source"]
    try:
        check_base_model(base)
    except ModelSourceError as e:
        if source:
            raise
        raise ModelSourceError(f"{e} (the base model this run trained on, {where}); if it moved, pass its new "
                               f"location: moa_jax.load_run(..., source=PATH) or --source PATH") from None
    return RunInfo(workdir, stage, adapters, base, moa, expert_names(saved, moa.num_experts),
                   training_system_prompt(data), training_prompt_format(data), saved["model"].get("dtype"),
                   saved["model"].get("quantize") or "none", saved)
