"""Hugging Face checkpoint directories (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text, and the text tower of a
multimodal Gemma 3): config.json + safetensors -> ModelConfig + params.

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

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
# Gemma 3 multimodal checkpoints: the text tower's state-dict prefix (transformers 5 | earlier), and the towers
# this text-only model leaves unread (never an "unused tensor" error).
_GEMMA3_TEXT_PREFIXES = ("model.language_model.", "language_model.model.")
_GEMMA3_OTHER_TOWERS = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                        "multi_modal_projector.")
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype strings -> numpy (little-endian by the format's spec).
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
           "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
# Tensors some checkpoints carry that the model recomputes: ignored, never an error.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------- config

def _rope(hf_cfg, params: Optional[dict] = None) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, RopeScaling or None). transformers 5 folds config.json's `rope_theta` and `rope_scaling`
    into one `rope_parameters` dict (with `rope_type`, and legacy `type`); older versions kept them apart.
    `params`: one layer type's dict of a per-layer-type `rope_parameters` (Gemma 3)."""
    params = dict(params or getattr(hf_cfg, "rope_parameters", None) or {})
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
    raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported (supported: default, linear, "
                      f"llama3)")


def _gemma_fields(hf_cfg) -> dict:
    """The Gemma 3 ModelConfig fields: norms, embedding scale, attention scale, per-layer-type RoPE."""
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf_cfg, field, None) is not None:  # Gemma 2's; Gemma 3 configs carry None
            raise ConfigError(f"{field}={getattr(hf_cfg, field)} is not supported (logit soft-capping, Gemma 2)")
    if getattr(hf_cfg, "use_bidirectional_attention", False):
        raise ConfigError("use_bidirectional_attention=True is not supported (a causal decoder only)")
    per_type = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    theta, scaling = _rope(hf_cfg, per_type.get("full_attention"))
    local_theta, local_scaling = _rope(hf_cfg, per_type.get("sliding_attention") or {
        "rope_theta": getattr(hf_cfg, "rope_local_base_freq", 10000.0)})
    if local_scaling is not None:
        raise ConfigError(f"rope_parameters.sliding_attention.rope_type={local_scaling.rope_type!r} is not "
                          f"supported (the sliding layers' RoPE is unscaled)")
    return dict(qk_norm=True, norm_unit_offset=True, sandwich_norms=True, embed_scale=True,
                query_pre_attn_scalar=float(hf_cfg.query_pre_attn_scalar), rope_theta=theta, rope_scaling=scaling,
                rope_local_theta=local_theta)


def model_config_from_hf(hf_cfg, *, param_dtype: str = "float32") -> ModelConfig:
    """Translates a transformers Llama/Mistral/Qwen2/Qwen3/Gemma 3 config object into our ModelConfig (for a
    multimodal gemma3 config, its text_config)."""
    model_type = hf_cfg.model_type
    if model_type == "gemma3":
        hf_cfg, model_type = hf_cfg.text_config, "gemma3_text"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported (supported: {list(SUPPORTED_MODEL_TYPES)})")
    gemma = model_type == "gemma3_text"
    act = getattr(hf_cfg, "hidden_activation", None) or getattr(hf_cfg, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"hidden_act {act!r} is not supported (supported: {list(_ACTIVATIONS)})")
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
    if model_type == "mistral" or gemma or getattr(hf_cfg, "use_sliding_window", False):
        sliding_window = getattr(hf_cfg, "sliding_window", None)
    layer_types = getattr(hf_cfg, "layer_types", None)
    if layer_types is not None:
        layer_types = tuple(layer_types)
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ConfigError(f"layer_types entries {unknown} are not supported (supported: full_attention, "
                              f"sliding_attention)")
        if model_type != "mistral" and "sliding_attention" not in layer_types:
            layer_types, sliding_window = None, None  # every layer global: the plain stack
    if model_type == "mistral" or (layer_types is not None and set(layer_types) == {"sliding_attention"}
                                   and not gemma):
        layer_types = None  # one window for all layers: the static path (no per-layer tables)
    heads = hf_cfg.num_attention_heads
    kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_cfg, "head_dim", None)
    theta, scaling = _rope(hf_cfg) if not gemma else (None, None)
    extra = _gemma_fields(hf_cfg) if gemma else dict(rope_theta=theta, rope_scaling=scaling,
                                                      qk_norm=model_type == "qwen3")
    return ModelConfig(
        vocab_size=hf_cfg.vocab_size, hidden_size=hf_cfg.hidden_size, intermediate_size=hf_cfg.intermediate_size,
        num_layers=hf_cfg.num_hidden_layers, num_heads=heads, num_kv_heads=kv_heads,
        # Only record head_dim when it is not D/H (e.g. Mistral-Nemo), so defaults compare equal.
        head_dim_override=head_dim if head_dim and head_dim * heads != hf_cfg.hidden_size else None,
        rms_norm_eps=float(hf_cfg.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)), attention_bias=attention_bias,
        max_position_embeddings=int(getattr(hf_cfg, "max_position_embeddings", 4096)),
        sliding_window=sliding_window, layer_types=layer_types, hidden_act=_ACTIVATIONS[act],
        param_dtype=param_dtype, name=model_type, **extra)


def load_hf_config(path: str, *, param_dtype: str = "float32") -> ModelConfig:
    """Reads `path/config.json` (local only) into a ModelConfig."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: a Hugging Face checkpoint directory needs config.json")
    try:
        with open(config_file) as f:
            raw = json.load(f)
        model_type = raw.get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{config_file} is not a valid JSON object: {e}") from e
    # Checked before AutoConfig, which would fail on unknown types with a less direct message.
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{config_file}: model_type {model_type!r} is not supported "
                          f"(supported: {list(SUPPORTED_MODEL_TYPES)})")
    text = raw.get("text_config") or raw   # a multimodal gemma3 keeps the decoder's fields there
    unknown = sorted(set(text.get("layer_types") or ()) - {"full_attention", "sliding_attention"})
    if unknown:   # transformers would raise its own ValueError first
        raise ConfigError(f"{config_file}: layer_types entries {unknown} are not supported (supported: "
                          f"full_attention, sliding_attention)")
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig  # deferred: importing transformers costs ~1 s
    try:
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as e:   # a field transformers itself rejects
        raise ConfigError(f"{config_file}: transformers cannot read it: {str(e).splitlines()[0]}") from None
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


_LAYER_NORMS = {"input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                "pre_ffn_norm": "pre_feedforward_layernorm", "post_ffn_norm": "post_feedforward_layernorm"}


def hf_key(path: tuple[str, ...], layer: Optional[int], prefix: str = "model.") -> str:
    """Tree leaf path -> Hugging Face state-dict key (`prefix`: of the decoder's keys, e.g. a multimodal Gemma 3's
    text tower)."""
    if path[0] == "embed":
        return prefix + "embed_tokens.weight"
    if path[0] == "final_norm":
        return prefix + "norm.weight"
    if path[0] == "lm_head":
        return "lm_head.weight"
    prefix = f"{prefix}layers.{layer}."
    if path[1] in _LAYER_NORMS:
        return prefix + _LAYER_NORMS[path[1]] + ".weight"
    module = "self_attn" if path[1] == "attn" else "mlp"
    return f"{prefix}{module}.{path[2]}.{'weight' if path[3] in ('kernel', 'scale') else 'bias'}"


def load_hf_checkpoint(path: str, *, param_dtype: str = "float32", quantize: str = "none",
                       place: Optional[Place] = None) -> tuple[ModelConfig, dict]:
    """Loads a Hugging Face Llama/Mistral/Qwen2 directory into (ModelConfig, param tree): numpy, or whatever
    `place` makes of each leaf (see tree.build_param_tree); quantize="int8" gives int8 projection kernels."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory: expected a Hugging Face checkpoint directory")
    cfg = replace(load_hf_config(path, param_dtype=param_dtype), quantize=quantize)
    reader = _SafetensorsReader(weight_files(path))
    prefix = next((p for p in _GEMMA3_TEXT_PREFIXES if p + "embed_tokens.weight" in reader.entries), "model.")
    used = set()

    def fetch(leaf, layer):
        key = hf_key(leaf, layer, prefix)
        used.add(key)
        return reader.get(key)

    params = build_param_tree(cfg, fetch, param_dtype, place)
    # A tied checkpoint may still store lm_head.weight (a copy of the embedding); anything else unused means the
    # config and the weights disagree, so refuse rather than silently drop weights.
    unused = sorted(k for k in reader.entries if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                    and not (cfg.tie_word_embeddings and k == "lm_head.weight")
                    and not (cfg.name == "gemma3_text" and k.startswith(_GEMMA3_OTHER_TOWERS)))
    if unused:
        raise CheckpointError(f"{reader.where} has {len(unused)} tensor(s) the model would ignore, e.g. "
                              f"{unused[:5]}; does config.json (layers, model_type, biases) match the weights?")
    return cfg, params


# ------------------------------------------------------------------------------------- config.json back

def family_config_json(cfg: ModelConfig) -> Optional[dict]:
    """The transformers config.json fields of a Qwen3 or Gemma 3 ModelConfig (model_config_from_hf's inverse), for
    a merged export of a base that came from GGUF; None for the Llama family (export.hf_config_dict's own table)."""
    if cfg.name not in ("qwen3", "gemma3_text"):
        return None
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(rope_type=cfg.rope_scaling.rope_type, factor=cfg.rope_scaling.factor)
        if cfg.rope_scaling.rope_type == "llama3":
            rs = cfg.rope_scaling
            rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                        original_max_position_embeddings=rs.original_max_position_embeddings)
    out = {"model_type": cfg.name, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
           "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
           "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
           "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": False}
    if cfg.name == "qwen3":
        out.update(architectures=["Qwen3ForCausalLM"], hidden_act="silu", rope_parameters=rope,
                   use_sliding_window=cfg.sliding_window is not None)
        if cfg.sliding_window is not None:
            out.update(sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types or ()) or None)
        return out
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    out.update(architectures=["Gemma3ForCausalLM"], hidden_activation="gelu_pytorch_tanh",
               query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),   # transformers' field is an int
               sliding_window=cfg.sliding_window,
               layer_types=list(cfg.layer_types or ["full_attention"] * cfg.num_layers),
               rope_parameters={"full_attention": rope, "sliding_attention": local},
               final_logit_softcapping=None, attn_logit_softcapping=None)
    return out
