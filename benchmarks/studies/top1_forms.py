"""Forms of one top-1 adapted projection, y = x @ W + s (x @ A[e_b]) @ B[e_b] with e_b the expert of sequence b,
timed against the library's gather path (`top1`), with the single LoRA's merged GEMM x @ (W + s A B) alongside:
the evidence behind BENCHMARKS.md "Targets still missed" for the top-1 train step and inference.

  single          `merged_lora_matmul`: one GEMM with the merged weight (the single-LoRA path; expert 0)
  top1            the library's gather path: x @ W plus `lora_top1` (A, B gathered per sequence, batched dots)
  ragged_merged   sequences sorted by expert, `lax.ragged_dot` over the E merged weights W + s A_e B_e
  ragged_lowrank  sorted the same way, `lax.ragged_dot` for x @ A_e and h @ B_e, plus x @ W
  per_sequence    `lax.map` over the sequences: merge the sequence's expert into W, one [T, Din] GEMM each
  sum_form        the delta as sum_r h[..., r] * B_e[r] (one fusion with the add of x @ W), not a batched dot

Configs: cpu-tiny (forward of the 256 -> 688 projection, gate/up of cpu-tiny, B x T = 16 x 128, E=10, R=8) and
cpu-tiny-grad (forward + gradients w.r.t. x, A and B; W frozen). Every form is checked against `top1` first.
At the projection level the merged GEMM's advantage shows in the forward only: in the isolated fwd+bwd XLA:CPU
fuses the merged path differently from the model (the model-level ratios are the suite's).

Usage: PYTHONPATH=. python -m benchmarks.studies.top1_forms [--config cpu-tiny|cpu-tiny-grad] [--rounds N]
Shape glossary: B batch, T tokens, Din / Dout projection widths, E experts, R rank.
"""
from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import Variant, block, compare_main
from moa_jax.nn.lora import lora_top1, merged_lora_matmul


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int = 16
    seq: int = 128
    d_in: int = 256
    d_out: int = 688
    experts: int = 10
    rank: int = 8
    scale: float = 2.0
    grad: bool = False


def _sorted(x, idx, num_experts):
    """Sequences sorted by expert: (tokens [B*T, Din] in that order, group sizes [E] in tokens, inverse order)."""
    order = jnp.argsort(idx)
    sizes = (jnp.bincount(idx, length=num_experts) * x.shape[1]).astype(jnp.int32)
    return x[order].reshape(-1, x.shape[-1]), sizes, jnp.argsort(order)


def forms(s: Shape) -> dict:
    """name -> f(x, W, A, B, idx) -> [B, T, Dout]."""
    b, t = s.batch, s.seq

    def single(x, w, a, bb, idx):
        return merged_lora_matmul(x.reshape(-1, s.d_in), w, a[0], bb[0], s.scale).reshape(b, t, -1)

    def top1(x, w, a, bb, idx):
        return x @ w + lora_top1(x, a, bb, idx, s.scale)

    def ragged_merged(x, w, a, bb, idx):
        xs, sizes, inv = _sorted(x, idx, s.experts)
        merged = w[None] + s.scale * jnp.einsum("edr,ero->edo", a, bb)                    # (E, Din, Dout)
        return jax.lax.ragged_dot(xs, merged, sizes).reshape(b, t, -1)[inv]

    def ragged_lowrank(x, w, a, bb, idx):
        xs, sizes, inv = _sorted(x, idx, s.experts)
        h = jax.lax.ragged_dot(xs, a, sizes) * s.scale                                    # (B*T, R)
        return x @ w + jax.lax.ragged_dot(h, bb, sizes).reshape(b, t, -1)[inv]

    def per_sequence(x, w, a, bb, idx):
        return jax.lax.map(lambda xe: xe[0] @ (w + s.scale * a[xe[1]] @ bb[xe[1]]), (x, idx))

    def sum_form(x, w, a, bb, idx):
        h = jnp.einsum("btd,bdr->btr", x, jnp.take(a, idx, axis=0))
        return x @ w + jnp.sum(h[..., :, None] * (s.scale * jnp.take(bb, idx, axis=0))[:, None], axis=-2)

    return {"single": single, "top1": top1, "ragged_merged": ragged_merged, "ragged_lowrank": ragged_lowrank,
            "per_sequence": per_sequence, "sum_form": sum_form}


def build(s: Shape) -> dict[str, Variant]:
    rng = np.random.default_rng(0)
    normal = lambda shape, std: jnp.asarray(std * rng.standard_normal(shape), jnp.float32)
    x, proj = normal((s.batch, s.seq, s.d_in), 1.0), normal((s.batch, s.seq, s.d_out), 1.0)
    w = normal((s.d_in, s.d_out), s.d_in ** -0.5)
    a, bb = normal((s.experts, s.d_in, s.rank), s.d_in ** -0.5), normal((s.experts, s.rank, s.d_out), 0.02)
    idx = jnp.asarray(rng.integers(0, s.experts, s.batch), jnp.int32)
    args = (x, w, a, bb, idx, proj)    # all arguments: XLA folds nothing into constants

    def program(f):
        if not s.grad:
            return jax.jit(lambda x, w, a, bb, idx, proj: f(x, w, a, bb, idx))
        def loss(x, a, bb, w, idx, proj):    # y is returned too: a model keeps it, XLA must not fold it away
            y = f(x, w, a, bb, idx)
            return jnp.sum(y * proj), y
        return jax.jit(lambda x, w, a, bb, idx, proj: jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            x, a, bb, w, idx, proj))
    fns = {k: program(f) for k, f in forms(s).items()}
    ref = fns["top1"](*args)
    for k, fn in fns.items():
        if k != "single":   # single runs expert 0 for every sequence: a different function, timed only
            for got, want in zip(jax.tree_util.tree_leaves(fn(*args)), jax.tree_util.tree_leaves(ref)):
                np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=k)
    return {k: Variant(k, lambda fn=fn: block(fn(*args))) for k, fn in fns.items()}


CONFIGS = {"cpu-tiny": Shape, "cpu-tiny-grad": lambda: Shape(grad=True)}

if __name__ == "__main__":
    sys.exit(compare_main(sys.argv[1:], doc=__doc__, configs=CONFIGS, build=build, baseline="top1", rounds=20))
