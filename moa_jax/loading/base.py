"""The frozen base model of a run or of `moa_jax.load_model`: a checkpoint from disk, or the smoke experiment's
random tiny Llama ("tiny-random", deterministic, so a smoke run's adapters load onto the same base).

    cfg, frozen, tokenizer = load_base_model("smollm2-135m-instruct", "float32", place=leaf_placer(mesh, fsdp))

Shape glossary: V vocab (the tiny model uses the embedded tokenizer's vocabulary).
"""
from __future__ import annotations

import jax
from flax import traverse_util

from moa_jax.config import ModelConfig, replace
from moa_jax.nn.quantize import quantize_frozen
from moa_jax.params import init_params

TINY_RANDOM = "tiny-random"


def tiny_model_config(vocab_size: int) -> ModelConfig:
    """The random tiny Llama used by the smoke experiment (with the embedded tokenizer's vocabulary)."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, tie_word_embeddings=True, name="tiny-random")


def default_dtype(dtype=None) -> str:
    """The compute dtype: `dtype` itself, or for None / "auto" float32 on CPU (bf16 is not faster there) and
    bfloat16 on accelerators."""
    if dtype not in (None, "auto"):
        return dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def check_base_model(source: str) -> None:
    """The cheap part of loading `source` (the path resolves, headers parse): a UserError now, not after minutes."""
    from moa_jax import loading
    loading.check_model_source(loading.DEFAULT_MODEL if source == TINY_RANDOM else source)


def load_base_model(source: str, dtype: str, quantize: str = "none", place=None):
    """-> (ModelConfig, frozen params, tokenizer or None when the source has none), the config's compute and
    storage dtype both `dtype`. Leaves are numpy, or placed leaf by leaf by `place(path, leaf)` (e.g.
    `sharding.leaf_placer`, or straight to the device); quantize="int8" stores the projection kernels as int8
    (moa_jax/nn/quantize.py)."""
    from moa_jax import loading   # deferred: the loaders pull in safetensors / gguf readers
    if source == TINY_RANDOM:
        tokenizer = loading.load_tokenizer(loading.DEFAULT_MODEL)
        cfg = replace(tiny_model_config(len(tokenizer)), dtype=dtype, param_dtype=dtype, quantize=quantize)
        params = jax.device_get(init_params(replace(cfg, quantize="none"), None, jax.random.PRNGKey(1234)))
        params = quantize_frozen(params) if quantize == "int8" else params
        if place is not None:
            params = traverse_util.unflatten_dict({k: place(k, v) for k, v in
                                                   traverse_util.flatten_dict(params).items()})
        return cfg, params, tokenizer
    cfg, params = loading.load_checkpoint(source, param_dtype=dtype, quantize=quantize, place=place)
    # A checkpoint saved without its tokenizer still computes logits: tokenizer None (generate() says so).
    return replace(cfg, dtype=dtype, param_dtype=dtype), params, loading.load_tokenizer(source, required=False)
