"""GGUF files (llama.cpp format; architectures llama, qwen2, qwen3 and gemma3) -> ModelConfig + dequantised params.

    cfg, params = load_gguf(path)           # numpy tree, see tree.py; every tensor dequantised to float32 first

Read with the `gguf` package (numpy only). Three things differ from a Hugging Face checkpoint:
  * Dims: GGUF lists a tensor's dims innermost-first (`token_embd.weight` is [D, V] in its metadata), but the
    reader's numpy arrays use the usual order, so a dequantised linear weight is [D_out, D_in] like torch's.
  * q/k rows: llama.cpp's converter permutes the rows of attn_q/attn_k of *llama* models from Hugging Face's
    rotate-half RoPE layout to interleaved pairs. We undo it exactly as transformers does
    (`LlamaTensorProcessor._reverse_permute_weights`): per head, rows [d0 d1 | e0 e1] are stored as
    [d0 e0 d1 e1]; un-permuting is a reshape to (heads, Dh/2, 2, D_in) and a swap of the middle two axes.
    qwen2, qwen3 and gemma3 files are not permuted (llama.cpp uses NeoX-style RoPE for them).
  * Tied head: there is no `output.weight`; the embedding is reused.
  * gemma3: llama.cpp's converter stores every norm weight as 1 + w (its RMSNorm multiplies by the weight); we
    subtract the 1 again, as transformers does, so the tree holds Hugging Face's w. What the metadata leaves out,
    llama.cpp hard-codes and so do we: every 6th layer global, the rest sliding (window
    `gemma3.attention.sliding_window`), the sliding layers' RoPE base 10000, and the attention scale
    key_length**-0.5 (hidden/heads for the 62-layer 27B).
Every tensor type the `gguf` package dequantises loads (F32/F16/BF16, Q4_0..Q8_0, the K-quants Q2_K..Q6_K, ...);
any other is a CheckpointError naming the tensor and its type.

Shape glossary: V vocab, D model width, F MLP width, H query heads, K key/value heads, Dh head width, L layers.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np

from moa_jax.config import ConfigError, ModelConfig, RopeScaling, replace
from moa_jax.loading.resolve import CheckpointError, MissingTensorError
from moa_jax.loading.tree import Place, build_param_tree

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
_PERMUTED_QK = ("llama",)  # architectures whose q/k rows llama.cpp permutes
_UNIT_OFFSET_NORMS = ("gemma3",)  # architectures whose norm weights llama.cpp stores as 1 + w
# llama.cpp's gemma3 layout (llama-model.cpp): every 6th layer global, the sliding layers' RoPE base.
_GEMMA3_GLOBAL_EVERY, _GEMMA3_LOCAL_THETA = 6, 10000.0

_LAYER_NAMES = {"input_norm": "attn_norm", "post_attn_norm": "ffn_norm", "q_proj": "attn_q", "k_proj": "attn_k",
                "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                "down_proj": "ffn_down", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
# With sandwich norms (Gemma) llama.cpp's ffn_norm is the MLP's pre-norm and the block-output norms have own names.
_SANDWICH_NAMES = {**_LAYER_NAMES, "post_attn_norm": "post_attention_norm", "pre_ffn_norm": "ffn_norm",
                   "post_ffn_norm": "post_ffw_norm"}
_GLOBAL_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}


def open_gguf(path: str):
    """A `gguf.GGUFReader` (memory-mapped), or a CheckpointError naming the file if it is truncated or corrupt.

    Cached per (path, mtime, size): parsing the metadata (e.g. 49k token strings) takes seconds, and the weights
    loader and the tokenizer both need the same file. The reader is read-only, so sharing it is safe."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    stat = os.stat(path)
    return _open_gguf_cached(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _open_gguf_cached(path: str, mtime_ns: int, size: int):
    import gguf  # absolute import: the `gguf` package, not this module
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct.error deep inside numpy views
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path} is truncated: tensor {t.name!r} ends at byte "
                                  f"{t.data_offset + t.n_bytes}, the file has {size}")
    return reader


def gguf_field(reader, key: str, default=None):
    """A metadata value (scalars as Python numbers/str, arrays as lists), or `default` if absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def model_config_from_gguf(reader, path: str = "", *, param_dtype: str = "float32") -> ModelConfig:
    """ModelConfig from GGUF metadata (`{arch}.block_count`, `{arch}.embedding_length`, ...)."""
    arch = gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported "
                          f"(supported: {list(SUPPORTED_ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}

    def need(key):
        value = gguf_field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata key {arch}.{key!r} is missing")
        return value

    if "rope_freqs.weight" in tensors:
        # Llama 3.1+ files store precomputed llama3 rope frequencies instead of the scaling parameters.
        raise ConfigError(f"{path}: llama3-style rope scaling in GGUF (rope_freqs.weight) is not supported; "
                          f"load the Hugging Face checkpoint instead")
    scaling = None
    scaling_type = gguf_field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        scaling = RopeScaling(rope_type="linear", factor=float(need("rope.scaling.factor")))
    elif scaling_type != "none":
        raise ConfigError(f"{path}: GGUF rope scaling type {scaling_type!r} is not supported (supported: linear)")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else gguf_field(reader, f"{arch}.vocab_size")
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF dims are innermost-first: [D, V]
    if vocab is None:
        raise CheckpointError(f"{path}: cannot tell the vocabulary size (no tokens, vocab_size or token_embd)")
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    layers = int(need("block_count"))
    head_dim = gguf_field(reader, f"{arch}.attention.key_length")
    family = {"qwen3": dict(qk_norm=True)}.get(arch, {})
    if arch == "gemma3":
        # Newer converters may write the pattern (every n-th layer global, or one flag per layer: True = sliding)
        # and the sliding layers' base; older files leave both to llama.cpp's defaults.
        pattern = gguf_field(reader, f"{arch}.attention.sliding_window_pattern", _GEMMA3_GLOBAL_EVERY)
        sliding = (list(map(bool, pattern)) if isinstance(pattern, list)
                   else [(i + 1) % int(pattern) != 0 for i in range(layers)])
        if len(sliding) != layers:
            raise CheckpointError(f"{path}: {arch}.attention.sliding_window_pattern has {len(sliding)} entries "
                                  f"for {layers} layers")
        family = dict(
            qk_norm=True, norm_unit_offset=True, sandwich_norms=True, embed_scale=True, hidden_act="gelu_tanh",
            query_pre_attn_scalar=float(hidden // heads if layers == 62 else (head_dim or hidden // heads)),
            sliding_window=int(need("attention.sliding_window")),
            rope_local_theta=float(gguf_field(reader, f"{arch}.rope.freq_base_swa", _GEMMA3_LOCAL_THETA)),
            layer_types=tuple("sliding_attention" if s else "full_attention" for s in sliding))
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_layers=layers, num_heads=heads,
        num_kv_heads=int(gguf_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim_override=int(head_dim) if head_dim and head_dim * heads != hidden else None,
        rope_theta=float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)), rope_scaling=scaling,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        max_position_embeddings=int(gguf_field(reader, f"{arch}.context_length", 4096)),
        param_dtype=param_dtype, name="gemma3_text" if arch == "gemma3" else arch, **family)


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation. weight: [n_heads*Dh, ...] (rows = output features)."""
    rows = weight.shape[0]
    # (heads, Dh/2, 2, ...) -> swap -> (heads, 2, Dh/2, ...): interleaved pairs back to two rotate-half halves.
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantize(t, path: str) -> np.ndarray:
    from gguf.quants import dequantize
    try:
        array = dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot dequantise tensor {t.name!r} of type "
                              f"{t.tensor_type.name}: {e}") from e
    # GGUF metadata lists dims innermost-first; numpy wants them outermost-first.
    expected = tuple(int(n) for n in reversed(t.shape))
    if array.shape != expected:
        array = array.reshape(expected)
    return array.astype(np.float32, copy=False)


def _gguf_name(path: tuple[str, ...], layer: Optional[int], sandwich: bool = False) -> str:
    if layer is None:
        return _GLOBAL_NAMES[path[0]]
    names = _SANDWICH_NAMES if sandwich else _LAYER_NAMES
    return f"blk.{layer}.{names[path[-2]]}.{'bias' if path[-1] == 'bias' else 'weight'}"


def load_gguf(path: str, *, param_dtype: str = "float32", quantize: str = "none",
              place: Optional[Place] = None) -> tuple[ModelConfig, dict]:
    """Loads a llama/qwen2/qwen3/gemma3 GGUF file into (ModelConfig, param tree), dequantising every tensor (then, with
    quantize="int8", requantizing the projection kernels per output channel); `place` as in build_param_tree."""
    path = os.fspath(path)
    reader = open_gguf(path)
    cfg = replace(model_config_from_gguf(reader, path, param_dtype=param_dtype), quantize=quantize)
    tensors = {t.name: t for t in reader.tensors}
    arch = gguf_field(reader, "general.architecture")
    used = set()

    def fetch(leaf, layer):
        name = _gguf_name(leaf, layer, cfg.sandwich_norms)
        if name not in tensors:
            raise MissingTensorError(f"tensor {name!r} not found in {path}")
        used.add(name)
        array = _dequantize(tensors[name], path)
        heads = cfg.num_heads if leaf[-2] == "q_proj" else cfg.num_kv_heads
        # (a tensor whose rows do not split into heads fails the shape check in build_param_tree instead)
        if arch in _PERMUTED_QK and leaf[-2] in ("q_proj", "k_proj") and array.shape[0] % (2 * heads) == 0:
            array = unpermute_qk(array, heads)
        if arch in _UNIT_OFFSET_NORMS and leaf[-1] == "scale":
            array = array - np.float32(1.0)  # stored 1 + w (module docstring)
        return array, f"{name!r} in {path}"

    params = build_param_tree(cfg, fetch, param_dtype, place)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"{path} has {len(unused)} tensor(s) the model would ignore, e.g. {unused[:5]}")
    return cfg, params
