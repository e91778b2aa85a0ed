"""The frozen base-weight tree every loader returns, and the one function that checks it.

Both loaders (hf.py, gguf.py) describe *where* each weight lives in their file format; this module owns *what*
the tree must look like: the leaf paths, their shapes from `ModelConfig`, the [D_in, D_out] kernel layout, the
stacking of per-layer weights over a leading L axis (the model scans its layers), the cast to `param_dtype` and,
with `ModelConfig.quantize == "int8"`, the int8 projection kernels with their `kernel_scale` [L, D_out] leaves
(moa_jax/nn/quantize.py).

Memory: each leaf is built in one preallocated host buffer of its final dtype, filled one source tensor (one
layer) at a time, then handed to `place` (e.g. onto a device mesh) and dropped, so loading never holds a second
full-precision copy: the host peak is one leaf plus one source tensor beyond what `place` keeps.

Shape glossary: V vocab, D model width, F MLP width, H query heads, K key/value heads, Dh head width, L layers.

    {"embed": {"embedding": [V, D]},
     "layers": {"input_norm": {"scale": [L, D]},
                "attn": {"q_proj": {"kernel": [L, D, H*Dh], "bias": [L, H*Dh]},   # bias only if attention_bias
                         "k_proj": {"kernel": [L, D, K*Dh], "bias": [L, K*Dh]},
                         "v_proj": {"kernel": [L, D, K*Dh], "bias": [L, K*Dh]},
                         "o_proj": {"kernel": [L, H*Dh, D]},
                         "q_norm": {"scale": [L, Dh]}, "k_norm": {"scale": [L, Dh]}},   # only if qk_norm
                "post_attn_norm": {"scale": [L, D]},
                "pre_ffn_norm": {"scale": [L, D]}, "post_ffn_norm": {"scale": [L, D]},    # only if sandwich_norms
                "mlp": {"gate_proj": {"kernel": [L, D, F]}, "up_proj": {"kernel": [L, D, F]},
                        "down_proj": {"kernel": [L, F, D]}}},
     "final_norm": {"scale": [D]},
     "lm_head": {"kernel": [D, V]}}                                               # absent if tie_word_embeddings
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import ml_dtypes
import numpy as np

from moa_jax.config import ATTENTION_PROJECTIONS, DTYPES, PROJECTIONS, ConfigError, ModelConfig
from moa_jax.loading.resolve import CheckpointError, MissingTensorError, ShapeMismatchError
from moa_jax.nn.quantize import SCALE_LEAF, is_quantized_kernel, quantize_int8

Path = tuple[str, ...]
# fetch(path, layer) -> (array in the file's own layout, a description "'key' in /file" for error messages).
# Kernels come back as [D_out, D_in] (torch Linear and GGUF both store them so); layer is None for global leaves.
Fetch = Callable[[Path, Optional[int]], tuple[np.ndarray, str]]
# place(path, finished host leaf) -> what the tree stores (a device array, or the numpy array itself).
Place = Callable[[Path, np.ndarray], Any]

_NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
              "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a config dtype name; bfloat16 comes from ml_dtypes (numpy has none)."""
    if name not in _NP_DTYPES:
        raise ConfigError(f"param_dtype={name!r} not in {DTYPES}")
    return _NP_DTYPES[name]


def expected_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Every leaf path of the tree and its shape, in a fixed order."""
    L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    shapes: dict[Path, tuple[int, ...]] = {("embed", "embedding"): (V, D),
                                           ("layers", "input_norm", "scale"): (L, D)}
    for name in ATTENTION_PROJECTIONS:
        d_in, d_out = cfg.projection_shape(name)
        shapes[("layers", "attn", name, "kernel")] = (L, d_in, d_out)
        if cfg.attention_bias and name != "o_proj":
            shapes[("layers", "attn", name, "bias")] = (L, d_out)
    if cfg.qk_norm:
        shapes[("layers", "attn", "q_norm", "scale")] = (L, cfg.head_dim)
        shapes[("layers", "attn", "k_norm", "scale")] = (L, cfg.head_dim)
    shapes[("layers", "post_attn_norm", "scale")] = (L, D)
    if cfg.sandwich_norms:
        shapes[("layers", "pre_ffn_norm", "scale")] = (L, D)
        shapes[("layers", "post_ffn_norm", "scale")] = (L, D)
    for name in PROJECTIONS[4:]:
        shapes[("layers", "mlp", name, "kernel")] = (L, *cfg.projection_shape(name))
    shapes[("final_norm", "scale")] = (D,)
    if not cfg.tie_word_embeddings:
        shapes[("lm_head", "kernel")] = (D, V)
    if cfg.quantize == "int8":
        for path, shape in list(shapes.items()):
            if is_quantized_kernel(path):
                shapes[path[:-1] + (SCALE_LEAF,)] = shape[:-2] + shape[-1:]
    return shapes


def _flatten(tree, prefix: Path = ()) -> dict[Path, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, sub in tree.items():
        out.update(_flatten(sub, prefix + (key,)))
    return out


def _key(path: Path) -> str:
    return "/".join(path)


def check_param_tree(params: dict, cfg: ModelConfig, where: str = "params") -> None:
    """Raises unless `params` has exactly the leaves of `expected_shapes(cfg)` with exactly those shapes."""
    expected = expected_shapes(cfg)
    got = _flatten(params)
    missing = [_key(p) for p in expected if p not in got]
    if missing:
        raise MissingTensorError(f"{where}: missing {missing} (config: {cfg.num_layers} layers, "
                                 f"tie_word_embeddings={cfg.tie_word_embeddings}, "
                                 f"attention_bias={cfg.attention_bias})")
    extra = [_key(p) for p in got if p not in expected]
    if extra:
        raise CheckpointError(f"{where}: unexpected leaves {extra} for this ModelConfig")
    for path, shape in expected.items():
        if tuple(np.shape(got[path])) != shape:
            raise ShapeMismatchError(f"{where}: {_key(path)} has shape {tuple(np.shape(got[path]))}, "
                                     f"expected {shape}")


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def build_param_tree(cfg: ModelConfig, fetch: Fetch, param_dtype: str = "float32",
                     place: Optional[Place] = None) -> dict:
    """Assembles the tree from a format-specific `fetch`: checks each source tensor's shape (naming its key and
    file), transposes kernels to [D_in, D_out], stacks layers into preallocated [L, ...] arrays and casts to
    `param_dtype` on the way (so a bfloat16 load never holds a float32 copy of the whole model). With
    cfg.quantize == "int8" each layer's projection kernel is quantized from the source values straight into an
    int8 buffer (+ its float32 scales). `place` receives every finished leaf (default: keep the numpy array)."""
    dtype = numpy_dtype(param_dtype)
    place = place or (lambda path, array: array)
    int8 = cfg.quantize == "int8"
    params: dict = {}
    for path, shape in expected_shapes(dataclasses.replace(cfg, quantize="none")).items():
        stacked = path[0] == "layers"
        quantized = int8 and is_quantized_kernel(path)
        leaf_shape = shape[1:] if stacked else shape
        # torch Linear / GGUF store [D_out, D_in]; the tree wants [D_in, D_out].
        file_shape = leaf_shape[::-1] if path[-1] == "kernel" else leaf_shape
        out = np.empty(shape, np.int8 if quantized else dtype)
        scale = np.empty(shape[:-2] + shape[-1:], np.float32) if quantized else None
        for layer in range(cfg.num_layers) if stacked else [None]:
            array, desc = fetch(path, layer)
            if tuple(array.shape) != file_shape:
                raise ShapeMismatchError(f"tensor {desc} has shape {tuple(array.shape)}, expected {file_shape} "
                                         f"(tree leaf {_key(path)}, from the model config)")
            array = array.T if path[-1] == "kernel" else array
            if quantized:
                out[layer], scale[layer] = quantize_int8(np.asarray(array))
            elif stacked:
                out[layer] = array  # assignment casts to dtype
            else:
                out[...] = array
            del array  # releases a memory-mapped source tensor before the next one is read
        _set(params, path, place(path, out))
        if quantized:
            _set(params, path[:-1] + (SCALE_LEAF,), place(path[:-1] + (SCALE_LEAF,), scale))
        del out, scale  # the host buffer goes once placed (place may keep it: then it IS the stored leaf)
    check_param_tree(params, cfg)
    return params
