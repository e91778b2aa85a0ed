"""Model and tokenizer loading: Hugging Face checkpoint directories or Hub ids, GGUF files and the embedded
default model.

    cfg, params = load_checkpoint("smollm2-135m-instruct")   # or "/path/model.gguf", "/path/hf_checkpoint_dir",
    tok = load_tokenizer("smollm2-135m-instruct")            # or a Hub id "HuggingFaceTB/SmolLM2-135M-Instruct"

A Hub id is fetched into the Hugging Face cache (honouring HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE=1), see
resolve.py.

`params` is a nested dict of numpy arrays, per-layer leaves stacked over a leading L axis and kernels stored
[D_in, D_out] (the contract is in tree.py). Nothing here unpickles: weights come from safetensors or GGUF only.
"""
from __future__ import annotations

from typing import Optional

from moa_jax.config import ModelConfig
from moa_jax.loading.gguf import load_gguf, open_gguf, unpermute_qk
from moa_jax.loading.hf import load_hf_checkpoint, load_hf_config, weight_files
from moa_jax.loading.resolve import (DEFAULT_MODEL, GGUF, CheckpointError, MissingTensorError, ModelSourceError,
                                     ShapeMismatchError, resolve_source)
from moa_jax.loading.tokenizer import load_tokenizer
from moa_jax.loading.tree import Place, build_param_tree, check_param_tree, expected_shapes, numpy_dtype


def load_checkpoint(source: str = DEFAULT_MODEL, *, param_dtype: str = "float32", quantize: str = "none",
                    place: Optional[Place] = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) for a model name, a .gguf file, a Hugging Face checkpoint directory or Hub id. Leaves are
    numpy unless `place(path, host_leaf)` puts each on devices as soon as it is built (tree.build_param_tree);
    quantize="int8" stores the projection kernels as int8 + per-channel scales (moa_jax/nn/quantize.py)."""
    kind, path = resolve_source(source)
    loader = load_gguf if kind == GGUF else load_hf_checkpoint
    return loader(path, param_dtype=param_dtype, quantize=quantize, place=place)


def check_model_source(source: str) -> None:
    """Cheap checks that `source` will load, run before anything slow: the name or path resolves, a GGUF header
    parses (the parse is cached for the real load), an HF directory's config.json parses and its weight files
    exist. A Hub id is downloaded here (or found in the cache), so a missing or pickle-only model fails before
    anything slow. Raises ModelSourceError / CheckpointError (UserErrors) naming the file or id."""
    kind, path = resolve_source(source)
    try:
        if kind == GGUF:
            open_gguf(path)
        else:
            load_hf_config(path)
            weight_files(path)
    except FileNotFoundError as e:
        if isinstance(e, ModelSourceError):
            raise
        raise ModelSourceError(str(e)) from None


__all__ = ["DEFAULT_MODEL", "CheckpointError", "MissingTensorError", "ModelSourceError", "ShapeMismatchError",
           "build_param_tree", "check_model_source", "check_param_tree", "expected_shapes", "load_gguf",
           "load_hf_checkpoint", "load_hf_config",
           "load_checkpoint", "load_tokenizer", "numpy_dtype", "resolve_source", "unpermute_qk"]
