"""Random sharded Llama checkpoints written tensor by tensor (numpy, no torch), and a subprocess worker that loads
one and reports its peak host memory, so the test process's own memory never interferes.

    python -m tests._load_memory_worker DIR DEVICES FSDP QUANTIZE
        -> one JSON line: bf16_bytes, rss_before, peak_growth, ratio (= peak_growth / bf16_bytes), values_equal

Tensor values are bfloat16 bit patterns drawn from a seed derived from the tensor's name (sign and exponent's top
bit cleared: finite, |x| < 2), so the worker regenerates every tensor to check the loaded values exactly.

Shape glossary: V vocab, D width, F MLP width, L layers, H heads, K kv heads.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import time
import zlib

import ml_dtypes
import numpy as np

_ST_DTYPES = {"bfloat16": "BF16", "float32": "F32"}


def tensor_values(name: str, shape: tuple, dtype: str) -> np.ndarray:
    """The deterministic value of one checkpoint tensor (torch layout: Linear weights [out, in])."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    bits = rng.integers(0, 1 << 16, int(np.prod(shape)), dtype=np.uint16) & np.uint16(0xBFFF)
    return bits.view(ml_dtypes.bfloat16).reshape(shape).astype(np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16"
                                                                 else np.float32)


def llama_tensors(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                  vocab: int) -> dict[str, tuple]:
    """HF Llama state-dict names -> shapes, untied head."""
    dh = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * dh, hidden),
                       p + "self_attn.k_proj.weight": (kv_heads * dh, hidden),
                       p + "self_attn.v_proj.weight": (kv_heads * dh, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * dh),
                       p + "mlp.gate_proj.weight": (intermediate, hidden),
                       p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def _write_safetensors(path: str, names: list[str], shapes: dict, dtype: str) -> None:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data), one tensor in memory
    at a time."""
    itemsize = np.dtype(np.float32 if dtype == "float32" else np.uint16).itemsize
    header, offset = {}, 0
    for name in names:
        size = int(np.prod(shapes[name])) * itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            f.write(tensor_values(name, shapes[name], dtype).tobytes())


def write_random_llama(path, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                       dtype: str = "bfloat16", shards: int = 4) -> int:
    """Writes config.json + `shards` safetensors files + model.safetensors.index.json; -> parameter count."""
    path = os.fspath(path)
    shapes = llama_tensors(hidden, intermediate, layers, heads, kv_heads, vocab)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
              "torch_dtype": dtype, "hidden_act": "silu"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    names = list(shapes)
    bounds = np.linspace(0, len(names), shards + 1).astype(int)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        _write_safetensors(os.path.join(path, file), names[bounds[s]:bounds[s + 1]], shapes, dtype)
        weight_map.update({n: file for n in names[bounds[s]:bounds[s + 1]]})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return sum(int(np.prod(s)) for s in shapes.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _check_values(params, cfg, quantize: str) -> bool:
    """Every loaded leaf equals the regenerated tensors (transposed, stacked; quantized like the loader)."""
    from moa_jax.loading.hf import hf_key
    from moa_jax.loading.tree import expected_shapes
    from moa_jax.nn.quantize import SCALE_LEAF, is_quantized_kernel, quantize_int8
    for path, shape in expected_shapes(cfg).items():
        if path[-1] == SCALE_LEAF:
            continue
        node = params
        for key in path[:-1]:
            node = node[key]
        leaf = np.asarray(node[path[-1]])
        leaf_shape = shape[1:] if path[0] == "layers" else shape
        for layer in range(cfg.num_layers) if path[0] == "layers" else [None]:
            if path[-1] == "kernel":   # the file holds [D_out, D_in]
                want = tensor_values(hf_key(path, layer), leaf_shape[::-1], "bfloat16").T
            else:
                want = tensor_values(hf_key(path, layer), leaf_shape, "bfloat16")
            got = leaf[layer] if layer is not None else leaf
            if quantize == "int8" and is_quantized_kernel(path):
                q, s = quantize_int8(np.ascontiguousarray(want))
                if not (np.array_equal(got, q) and np.array_equal(np.asarray(node[SCALE_LEAF])[layer], s)):
                    return False
            elif not np.array_equal(got, want.astype(got.dtype)):
                return False
    return True


def main(directory: str, devices: int, fsdp: bool, quantize: str) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from moa_jax.config import MeshConfig, replace
    from moa_jax.loading import expected_shapes, load_checkpoint
    from moa_jax.sharding import leaf_placer, make_mesh
    from transformers import AutoConfig  # noqa: F401  (the config reader's import: ~200 MB, not weights)
    mesh = make_mesh(MeshConfig(data=devices, expert=1))
    with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM, so the peak is the load's own
        f.write("5")
    rss_before = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    cfg, params = load_checkpoint(directory, param_dtype="bfloat16", quantize=quantize, place=leaf_placer(mesh, fsdp))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") * 1024
    bf16_bytes = 2 * sum(int(np.prod(s)) for s in expected_shapes(replace(cfg, quantize="none")).values())
    print(json.dumps({"bf16_bytes": bf16_bytes, "rss_before": rss_before, "peak_growth": peak - rss_before,
                      "ratio": (peak - rss_before) / bf16_bytes, "load_seconds": round(seconds, 2),
                      "devices": devices, "fsdp": fsdp, "quantize": quantize,
                      "values_equal": _check_values(params, cfg, quantize)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4])
