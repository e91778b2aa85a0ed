"""Weight-only int8 for the frozen base: per-output-channel symmetric quantization of the seven projection kernels.

    q, scale = quantize_int8(w)           # w [..., Din, Dout] float -> q int8 [..., Din, Dout], scale f32 [..., Dout]
    w_hat = dequantize(q, scale)          # q * scale, |w - w_hat| <= scale / 2 per output channel
    frozen_q = quantize_frozen(frozen)    # a base tree -> its int8 form; jax.eval_shape-able, numpy in -> numpy out

What is quantized: `layers/{attn,mlp}/<proj>/kernel` [L, Din, Dout] becomes int8 [L, Din, Dout] plus a sibling
leaf `kernel_scale` [L, Dout] (float32). Everything else keeps the base dtype: the embedding (a gather, no matmul
to fold a scale into; tied models also use it as the LM head), `lm_head` (its rounding error would land on the
logits directly, with nothing after it to absorb it), norms and biases (tiny). The experts (`lora_a`, `lora_b`)
and routers are trainable and never quantized.

The model dequantizes inside the matmul (`int8_matmul`): x @ q.astype(dtype) * scale. The scale is per output
column, so it is applied to the [.., Dout] product, never to the weight; the int8 -> dtype convert happens inside
the layer scan (fused into the dot where the backend can), so at most one layer's kernels exist in full precision
(tests/test_quantize.py checks the compiled temporary memory).

Shape glossary: L layers, Din/Dout projection widths, N tokens.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moa_jax.config import PROJECTIONS, QUANTIZE_MODES, ConfigError

SCALE_LEAF = "kernel_scale"
_INT8_MAX = 127.0


def check_quantize(value) -> str:
    """Normalise a `quantize` setting (None -> "none") and reject unknown values naming the valid ones."""
    value = "none" if value is None else value
    if value not in QUANTIZE_MODES:
        raise ConfigError(f"quantize={value!r} is not supported; valid: {list(QUANTIZE_MODES)}")
    return value


def is_quantized_kernel(path: tuple[str, ...]) -> bool:
    """True for the frozen projection kernels int8 applies to: layers/<attn|mlp>/<proj>/kernel."""
    return len(path) == 4 and path[0] == "layers" and path[2] in PROJECTIONS and path[3] == "kernel"


def quantize_int8(w):
    """w [..., Din, Dout] -> (q int8 [..., Din, Dout], scale float32 [..., Dout]), symmetric per output channel.

    scale = max |w| over Din / 127 (an all-zero channel gets scale 1, so q = 0 and the channel stays exact);
    q = round(w / scale). numpy in -> numpy out (the loader quantizes one layer at a time on the host); jax in ->
    jax out (traceable, so `jax.eval_shape` gives the abstract int8 tree)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    w32 = w.astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=-2)                                          # (..., Dout)
    # times the f32 reciprocal, not / 127: XLA rewrites the division so, and numpy and jax must agree bit for bit
    scale = xp.where(amax > 0, amax * xp.float32(1.0 / _INT8_MAX), xp.ones_like(amax)).astype(xp.float32)
    q = xp.clip(xp.round(w32 / scale[..., None, :]), -_INT8_MAX, _INT8_MAX).astype(xp.int8)
    return q, scale


def dequantize(q, scale, dtype=jnp.float32):
    """(q [..., Din, Dout] int8, scale [..., Dout]) -> q * scale in `dtype` (tests and analysis; the model never
    builds this, see `int8_matmul`)."""
    xp = np if isinstance(q, np.ndarray) else jnp
    return (q.astype(xp.float32) * scale[..., None, :]).astype(dtype)


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., Din] @ dequantize(q, scale) -> [..., Dout] in x.dtype, as (x @ q) * scale: exact algebra for a
    per-output-column scale. int8 values are integers in [-127, 127], exact in bfloat16 and float16 too."""
    return (x @ q.astype(x.dtype)) * scale.astype(x.dtype)


def quantize_frozen(frozen: Any) -> Any:
    """A frozen base tree (or the full tree: trainable leaves are left alone) -> the same tree with every
    projection kernel replaced by int8 `kernel` + float32 `kernel_scale`. Works on numpy, jax arrays and, under
    `jax.eval_shape(quantize_frozen, abstract_tree)`, on ShapeDtypeStructs."""
    flat = traverse_util.flatten_dict(frozen)
    out = {}
    for path, leaf in flat.items():
        if is_quantized_kernel(path):
            out[path], out[path[:-1] + (SCALE_LEAF,)] = quantize_int8(leaf)
        else:
            out[path] = leaf
    return traverse_util.unflatten_dict(out)


def param_bytes(tree: Any) -> int:
    """Total bytes of the leaves of a (possibly abstract) tree."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def int8_kernel_init(key, shape, dtype=jnp.int8):
    """Random int8 kernel for freshly initialised (test) models: uniform integers in [-127, 127]."""
    return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(dtype)


def int8_scale_init(d_in: int):
    """Scales that give `int8_kernel_init`'s kernels lecun-normal variance 1 / Din (uniform ints have std ~73.3)."""
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, 1.0 / (_INT8_MAX / np.sqrt(3.0) * np.sqrt(d_in)), dtype)
    return init
