"""A self-describing MoA model folder (`MoAModel.save_pretrained`, `moa_jax.from_pretrained`, `push_to_hub`).

    DIR/adapters.safetensors   the experts and routers: the trainable tree (train/checkpoint.py save_adapters)
    DIR/config.json            {"format": "moa_jax.pretrained", "format_version": 1,
                                "model": {"source": the base model, every ModelConfig field},
                                "moa": MoAConfig, "domains": expert names in expert order,
                                "data": {"system_prompt", "prompt_format"}  (how prompts are formatted),
                                "peft_layouts": per expert imported from PEFT, its own shape (peft_import.py)}

It is an adapters folder like a run stage's (`load_model(SOURCE, adapters=DIR)` reads it too), written
atomically; the frozen base is not in it: loading rebuilds it from the recorded source (an embedded name, a Hub
id, or a local path made absolute), in the recorded dtypes and storage, so the rebuilt model equals the saved one
array for array. A folder on the Hugging Face Hub is fetched by its repository id (`ORG/NAME[@REVISION]`) with
huggingface_hub; `upload_pretrained` pushes one with `create_repo` + `upload_folder`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from moa_jax.config import ModelConfig, MoAConfig
from moa_jax.errors import UserError
from moa_jax.loading.resolve import looks_like_hub_id
from moa_jax.peft_import import ExpertLayout
from moa_jax.run_artifacts import CONFIG_FILE, WEIGHTS_FILE

FORMAT, FORMAT_VERSION = "moa_jax.pretrained", 1
FILES = (CONFIG_FILE, WEIGHTS_FILE)


class PretrainedError(UserError, ValueError):
    """A folder (or Hub repository) that is not a save_pretrained folder, or a save into a folder holding other
    files."""


@dataclasses.dataclass(frozen=True)
class PretrainedInfo:
    """What a save_pretrained folder records (read_pretrained)."""
    directory: str                # the local folder (a Hub repository's snapshot)
    source: str                   # the base model
    model: dict                   # the ModelConfig fields, as saved
    domains: tuple                # expert names, expert e <-> domains[e]; () when the model had none
    system_prompt: Optional[str]  # exactly as the model had it (already resolved, not "auto")
    prompt_format: Optional[str]
    layouts: tuple                # ExpertLayout per expert imported from PEFT; () otherwise


def recorded_source(source: str) -> str:
    """A local base-model path becomes absolute, so the folder loads from any working directory; a name or Hub id
    is kept as given."""
    path = os.path.expanduser(source)
    return os.path.abspath(path) if os.path.exists(path) else source


def pretrained_config(source: str, cfg: ModelConfig, moa: MoAConfig, domains, system_prompt: Optional[str],
                      prompt_format: Optional[str], layouts) -> dict:
    """The config.json of a save_pretrained folder."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "model": {"source": recorded_source(source), **dataclasses.asdict(cfg)},
            "moa": dataclasses.asdict(moa), "domains": list(domains),
            "data": {"system_prompt": system_prompt, "prompt_format": prompt_format},
            "peft_layouts": [layout.to_json() for layout in layouts]}


def _is_pretrained(directory: str) -> bool:
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_pretrained(directory: str, trainable: dict, config: dict) -> str:
    """Write the folder atomically (replacing an earlier save_pretrained folder there). -> its path. A folder
    holding anything else is refused: the save replaces the whole folder."""
    from moa_jax.train.checkpoint import save_adapters   # orbax: deferred
    directory = os.fspath(directory)
    if os.path.isdir(directory) and os.listdir(directory) and not _is_pretrained(directory):
        raise PretrainedError(f"save_pretrained: {directory} already holds files that are not a save_pretrained "
                              f"folder; save into a new or empty folder (an earlier save_pretrained folder is "
                              f"replaced)")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise PretrainedError(f"save_pretrained: {directory} is a file; name a folder")
    save_adapters(directory, trainable, config)
    return directory


def _hub_folder(repo: str) -> str:
    """The local snapshot of Hub repository `ORG/NAME[@REVISION]`, only the folder's own files."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors
    repo_id, _, revision = repo.partition("@")
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision or None, allow_patterns=list(FILES))
    except (hub_errors.HFValidationError, hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError,
            OSError) as e:
        reason = (str(e).splitlines() or [""])[0]
        raise PretrainedError(f"from_pretrained: {repo!r} is not a local folder, and fetching it from the Hugging "
                              f"Face Hub failed ({type(e).__name__}: {reason})") from None


def read_pretrained(path: str) -> PretrainedInfo:
    """The record of a save_pretrained folder: a local folder, or a Hub repository id (`ORG/NAME[@REVISION]`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        directory = path
    elif not os.path.exists(path) and looks_like_hub_id(path):
        directory = _hub_folder(path)
    else:
        raise PretrainedError(f"from_pretrained: {path} is not a folder (nor a Hub repository id ORG/NAME)")
    where = os.path.join(directory, CONFIG_FILE)
    if not (_is_pretrained(directory) and os.path.isfile(os.path.join(directory, WEIGHTS_FILE))):
        raise PretrainedError(f"from_pretrained: {path} is not a save_pretrained folder ({CONFIG_FILE} with "
                              f"\"format\": \"{FORMAT}\" and {WEIGHTS_FILE}); a run's adapters load with "
                              f"moa_jax.load_run(WORKDIR) or load_model(SOURCE, adapters=DIR)")
    with open(where) as f:
        saved = json.load(f)
    if saved.get("format_version", 0) > FORMAT_VERSION:
        raise PretrainedError(f"{where}: format_version {saved['format_version']} is newer than this moa_jax reads "
                              f"({FORMAT_VERSION}); upgrade moa_jax")
    data = saved.get("data") or {}
    return PretrainedInfo(directory, saved["model"]["source"], saved["model"], tuple(saved.get("domains") or ()),
                          data.get("system_prompt"), data.get("prompt_format"),
                          tuple(ExpertLayout.from_json(d) for d in saved.get("peft_layouts") or ()))


def upload_pretrained(folder: str, repo_id: str, *, private: Optional[bool] = None, token=None,
                      revision: Optional[str] = None, commit_message: str = "Upload MoA model (moa_jax)"):
    """Create the model repository `repo_id` (and branch `revision`) if needed and upload the save_pretrained
    `folder`'s files to it. -> huggingface_hub's CommitInfo (its .commit_url, .oid)."""
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    if revision is not None:   # a branch: created from main when it does not exist yet
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                             commit_message=commit_message, allow_patterns=list(FILES))
