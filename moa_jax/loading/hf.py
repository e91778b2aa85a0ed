"""Hugging Face checkpoint directories (Llama, Mistral, Qwen2): config.json + safetensors -> ModelConfig + params.

    cfg, params = load_hf_checkpoint("/models/Qwen2-0.5B")      # numpy tree, see tree.py

Weights are read from `model.safetensors` or from the shards a `model.safetensors.index.json` names. The
header of each file is validated by `safetensors.safe_open` (which rejects truncated files); tensors are then
memory-mapped straight from the file with numpy, because safetensors' numpy backend cannot return bfloat16
(numpy has no such dtype) and most current checkpoints are bfloat16; ml_dtypes provides it. Never unpickles:
`pytorch_model.bin` checkpoints are refused with a conversion hint.

Shape glossary: V vocab, D model width, F MLP width, H query heads, K key/value heads, Dh head width, L layers.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Optional

import ml_dtypes
import numpy as np

from moa_jax.config import ConfigError, ModelConfig, RopeScaling, replace
from moa_jax.loading.resolve import PICKLE_HINT, CheckpointError, MissingTensorError, index_shards
from moa_jax.loading.tree import Place, build_param_tree

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype strings -> numpy (little-endian by the format's spec).
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
           "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
# Tensors some checkpoints carry that the model recomputes: ignored, never an error.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------- config

def _rope(hf_cfg) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, RopeScaling or None). transformers 5 folds config.json's `rope_theta` and `rope_scaling`
    into one `rope_parameters` dict (with `rope_type`, and legacy `type`); older versions kept them apart."""
    params = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    if not params:  # transformers < 5 attribute layout
        params = dict(getattr(hf_cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    theta = float(params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return theta, RopeScaling(
            rope_type="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    raise ConfigError(f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")


def model_config_from_hf(hf_cfg, *, param_dtype: str = "float32") -> ModelConfig:
    """Translates a transformers Llama/Mistral/Qwen2 config object into our ModelConfig."""
    model_type = hf_cfg.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported (supported: {list(SUPPORTED_MODEL_TYPES)})")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf_cfg.hidden_act!r} is not supported (SwiGLU with silu only)")
    if getattr(hf_cfg, "mlp_bias", False):
        raise ConfigError("mlp_bias=True is not supported (the param tree has no MLP biases)")
    if model_type == "qwen2":
        attention_bias = True  # Qwen2 always has q/k/v biases and no o_proj bias; its config has no flag
    else:
        attention_bias = bool(getattr(hf_cfg, "attention_bias", False))
        if attention_bias:
            # Llama's flag also adds an o_proj bias, which the param tree does not have: refuse, never drop it.
            raise ConfigError(f"{model_type} with attention_bias=True is not supported: it also has an o_proj "
                              f"bias, which the param tree does not hold")
    sliding_window = None
    if model_type == "mistral" or getattr(hf_cfg, "use_sliding_window", False):
        sliding_window = getattr(hf_cfg, "sliding_window", None)
    heads = hf_cfg.num_attention_heads
    kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_cfg, "head_dim", None)
    theta, scaling = _rope(hf_cfg)
    return ModelConfig(
        vocab_size=hf_cfg.vocab_size, hidden_size=hf_cfg.hidden_size, intermediate_size=hf_cfg.intermediate_size,
        num_layers=hf_cfg.num_hidden_layers, num_heads=heads, num_kv_heads=kv_heads,
        # Only record head_dim when it is not D/H (e.g. Mistral-Nemo), so defaults compare equal.
        head_dim_override=head_dim if head_dim and head_dim * heads != hf_cfg.hidden_size else None,
        rope_theta=theta, rope_scaling=scaling, rms_norm_eps=float(hf_cfg.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)), attention_bias=attention_bias,
        max_position_embeddings=int(getattr(hf_cfg, "max_position_embeddings", 4096)),
        sliding_window=sliding_window, param_dtype=param_dtype, name=model_type)


def load_hf_config(path: str, *, param_dtype: str = "float32") -> ModelConfig:
    """Reads `path/config.json` (local only) into a ModelConfig."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: a Hugging Face checkpoint directory needs config.json")
    try:
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{config_file} is not a valid JSON object: {e}") from e
    # Checked before AutoConfig, which would fail on unknown types with a less direct message.
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{config_file}: model_type {model_type!r} is not supported "
                          f"(supported: {list(SUPPORTED_MODEL_TYPES)})")
    from transformers import AutoConfig  # deferred: importing transformers costs ~1 s
    hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    return model_config_from_hf(hf_cfg, param_dtype=param_dtype)


# --------------------------------------------------------------------------------------------- weights

def weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (one file, or the shards its index names)."""
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        shards = index_shards(index)
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"{index} names shard file(s) that do not exist in {path}: {missing}")
        return [os.path.join(path, s) for s in shards]
    if os.path.isfile(single):
        return [single]
    pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.exists(os.path.join(path, n))]
    hint = f" Found {pickled}: {PICKLE_HINT}." if pickled else ""
    raise FileNotFoundError(f"no weights in {path}: expected {WEIGHTS_FILE} or {INDEX_FILE}.{hint}")


class _SafetensorsReader:
    """Maps tensor key -> (file, dtype, shape, byte offset) over one or many shards; reads lazily by memmap."""

    def __init__(self, files: list[str]):
        from safetensors import SafetensorError, safe_open
        self.entries: dict[str, tuple[str, np.dtype, tuple, int]] = {}
        for file in files:
            try:  # safe_open validates the header against the file size: truncation is caught here
                with safe_open(file, framework="numpy"):
                    pass
            except SafetensorError as e:
                raise CheckpointError(f"{file} is not a valid safetensors file (truncated or corrupt?): {e}") from e
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {info['dtype']}")
                begin, _ = info["data_offsets"]
                self.entries[key] = (file, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + header_len + begin)
        self.where = files[0] if len(files) == 1 else f"{os.path.dirname(files[0])} ({len(files)} shards)"

    def get(self, key: str) -> tuple[np.ndarray, str]:
        if key not in self.entries:
            raise MissingTensorError(f"tensor {key!r} not found in {self.where}")
        file, dtype, shape, offset = self.entries[key]
        if 0 in shape:
            return np.zeros(shape, dtype), f"{key!r} in {file}"  # np.memmap refuses empty maps
        array = np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape or (1,)).reshape(shape)
        return array, f"{key!r} in {file}"


def hf_key(path: tuple[str, ...], layer: Optional[int]) -> str:
    """Tree leaf path -> Hugging Face state-dict key."""
    if path[0] == "embed":
        return "model.embed_tokens.weight"
    if path[0] == "final_norm":
        return "model.norm.weight"
    if path[0] == "lm_head":
        return "lm_head.weight"
    prefix = f"model.layers.{layer}."
    if path[1] == "input_norm":
        return prefix + "input_layernorm.weight"
    if path[1] == "post_attn_norm":
        return prefix + "post_attention_layernorm.weight"
    module = "self_attn" if path[1] == "attn" else "mlp"
    return f"{prefix}{module}.{path[2]}.{'weight' if path[3] == 'kernel' else 'bias'}"


def load_hf_checkpoint(path: str, *, param_dtype: str = "float32", quantize: str = "none",
                       place: Optional[Place] = None) -> tuple[ModelConfig, dict]:
    """Loads a Hugging Face Llama/Mistral/Qwen2 directory into (ModelConfig, param tree): numpy, or whatever
    `place` makes of each leaf (see tree.build_param_tree); quantize="int8" gives int8 projection kernels."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory: expected a Hugging Face checkpoint directory")
    cfg = replace(load_hf_config(path, param_dtype=param_dtype), quantize=quantize)
    reader = _SafetensorsReader(weight_files(path))
    used = set()

    def fetch(leaf, layer):
        key = hf_key(leaf, layer)
        used.add(key)
        return reader.get(key)

    params = build_param_tree(cfg, fetch, param_dtype, place)
    # A tied checkpoint may still store lm_head.weight (a copy of the embedding); anything else unused means the
    # config and the weights disagree, so refuse rather than silently drop weights.
    unused = sorted(k for k in reader.entries if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                    and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    if unused:
        raise CheckpointError(f"{reader.where} has {len(unused)} tensor(s) the model would ignore, e.g. "
                              f"{unused[:5]}; does config.json (layers, model_type, biases) match the weights?")
    return cfg, params
