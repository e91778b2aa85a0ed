"""Compile-only memory plan of the real stage-2 train step: no weights are allocated, so a 7-8B plan runs on a CPU.

  python -m benchmarks.memory --shape llama3-8b --batch 8 --seq 2048 [--experts 10 --rank 16 --remat full
      --dtype bfloat16 --quantize int8 --devices 8]

It builds the abstract trees (`jax.eval_shape` of the model's init, the optimiser state, a [1, B, T] micro-batch
with compact targets at T/2 positions, as `jax.ShapeDtypeStruct`s with their shardings), lowers and compiles
`moa_jax.train.loop.jit_train_step` (the function training runs: state donated, the stage-2 loss, AdamW) and prints ONE
JSON line:
  argument_bytes, output_bytes, temp_bytes, alias_bytes  from `compiled.memory_analysis()` (per device);
  peak_bytes = argument + output + temp - alias: everything alive at once if the donated state's outputs reuse
               its buffers (alias) and XLA's temporaries all peak together (an upper bound on the live set);
  analytic: params (frozen base + experts/routers), optimizer (Adam moments, f32), grads, and an activation
            estimate for the remat policy (what the backward keeps + one layer's working set + one attention block
            + one LM-head chunk), per device.
--devices N runs on N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set before jax is
imported) with the frozen base split over them (MeshConfig.fsdp, the 'fsdp' rule of moa_jax/sharding.py).
--remat defaults to 'full', what ModelConfig.remat='auto' picks on an accelerator (on CPU 'auto' would pick
'projections'). A bad shape name or option exits 2 with one line.

XLA:CPU has no bf16 matmul: it converts bf16 operands to f32, and its while-loop invariant code motion then hoists
the convert of each STACKED [L, Din, Dout] frozen kernel (and of the saved [L, B, T, D] layer inputs) out of the
layer loop, so the CPU program holds an f32 copy of the whole base (Llama-3-8B: temp 44.1 instead of 13.8 GiB;
the buffer assignment lists wrapped_convert f32[32,4096,14336] x3, f32[32,8,2048,4096], f32[4096,128256], ...).
GPU/TPU compilers run bf16 matmuls natively and make no such copies. So the planner disables those two hoisting
passes (XLA_FLAGS --xla_disable_hlo_passes=while-loop-invariant-code-motion,...): the f32 converts then stay per
layer, like one layer's working set, and the compiled peak stays near the analytic model (33.5 vs 38.4 GiB).
--xla-licm keeps the passes (the raw XLA:CPU number).

Shape glossary: B batch, T tokens, K target positions, D width, F ffn width, V vocab, L layers, E experts, R rank,
H heads, Dh head width, N devices.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

SHAPE_NAMES = ("llama3-8b", "qwen2-7b", "qwen3-8b", "gemma3-4b", "gemma3-270m", "gpu-1b", "smollm2", "cpu-tiny", "smoke")
REMATS = ("full", "projections", "none")
GIB = 2 ** 30
NO_LICM = "--xla_disable_hlo_passes=while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True, choices=SHAPE_NAMES)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--experts", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--remat", default="full", choices=REMATS)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--quantize", default="none", choices=("none", "int8"))
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--layers", type=int, default=0, help="override the shape's number of layers (0: keep)")
    p.add_argument("--xla-licm", action="store_true",
                   help="keep XLA's while-loop invariant code motion (the raw XLA:CPU figure; see the docstring)")
    args = p.parse_args(argv)
    for name in ("batch", "seq", "experts", "rank", "devices", "loss_chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch % args.devices:
        p.error(f"--batch {args.batch} must be divisible by --devices {args.devices} (the batch is split over them)")
    return args


def model_config(name: str, dtype: str, remat: str, loss_chunk: int):
    """The shape table: real Hugging Face config numbers for the 7-8B models, the benchmark configs otherwise."""
    from benchmarks import programs as P
    from moa_jax.config import replace
    table = {"llama3-8b": P.llama3_8b, "qwen2-7b": P.qwen2_7b, "qwen3-8b": qwen3_8b, "gemma3-4b": gemma3_4b,
             "gemma3-270m": gemma3_270m, "gpu-1b": lambda: P.gpu_1b().model,
             "smollm2": lambda: P.smollm2().model, "cpu-tiny": lambda: P.cpu_tiny().model,
             "smoke": lambda: P.smoke().model}
    return replace(table[name](), dtype=dtype, param_dtype=dtype, remat=remat, loss_chunk=loss_chunk)


def qwen3_8b():
    """Qwen/Qwen3-8B's config.json (bf16; q/k norms, head_dim 128, untied head)."""
    from moa_jax.config import ModelConfig
    return ModelConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                       num_kv_heads=8, head_dim_override=128, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=40960, qk_norm=True, dtype="bfloat16", param_dtype="bfloat16",
                       name="qwen3-8b")


def gemma3_4b():
    """google/gemma-3-4b-pt's text_config (bf16): 34 layers, every 6th global, window 1024, linear RoPE scaling 8 on
    the global layers, head_dim 256, the tied 262k-entry head."""
    from moa_jax.config import ModelConfig, RopeScaling
    layers = 34
    return ModelConfig(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_layers=layers, num_heads=8,
                       num_kv_heads=4, head_dim_override=256, rope_theta=1e6, rms_norm_eps=1e-6,
                       rope_scaling=RopeScaling(rope_type="linear", factor=8.0), tie_word_embeddings=True,
                       max_position_embeddings=131072, sliding_window=1024, rope_local_theta=10000.0,
                       layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                         for i in range(layers)),
                       qk_norm=True, norm_unit_offset=True, sandwich_norms=True, embed_scale=True,
                       hidden_act="gelu_tanh", query_pre_attn_scalar=256.0, dtype="bfloat16",
                       param_dtype="bfloat16", name="gemma3-4b")


def gemma3_270m():
    """Gemma 3 270M as the known model gemma3-270m loads it: 18 layers, every 6th global, window 512, head_dim 256
    over 4 query heads and 1 kv head, the tied 262k-entry head (1.7x the body's FLOPs per target token)."""
    from moa_jax.config import ModelConfig
    layers = 18
    return ModelConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_layers=layers, num_heads=4,
                       num_kv_heads=1, head_dim_override=256, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, max_position_embeddings=32768, sliding_window=512,
                       rope_local_theta=10000.0,
                       layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                         for i in range(layers)),
                       qk_norm=True, norm_unit_offset=True, sandwich_norms=True, embed_scale=True,
                       hidden_act="gelu_tanh", query_pre_attn_scalar=256.0, dtype="bfloat16",
                       param_dtype="bfloat16", name="gemma3-270m")


def activation_estimate(cfg, moa, batch: int, seq: int, targets: int, devices: int) -> int:
    """Bytes of activations per device (module docstring): saved per layer + one layer's working set + one
    attention block's scores + one LM-head chunk, each with its gradient."""
    from moa_jax.nn.layers import ATTENTION_QUERY_BLOCK
    from moa_jax.nn.model import resolve_remat
    b = batch // devices
    tok = b * seq
    dt = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    d, f, h, k, dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj_out = h * dh + 2 * k * dh + d + 2 * f + d                      # q, k, v, o, gate, up, down outputs
    lora_h = moa.rank * len(moa.targets) * 4
    # dropout masks are not kept: only their 8-byte keys (lora.dropout_bits rebuilds them in the backward)
    policy = resolve_remat(cfg.remat)
    per_layer = {"full": d * dt, "projections": (proj_out + h * dh) * dt + lora_h,
                 "none": (2 * proj_out + 4 * d + f) * dt + lora_h}[policy]
    saved = cfg.num_layers * tok * (per_layer + d * dt)                 # + the scan's layer inputs
    working = 2 * tok * (proj_out + h * dh + 4 * d + f) * dt            # one layer recomputed + its gradients
    attention = 3 * b * h * min(seq, ATTENTION_QUERY_BLOCK) * seq * 4   # scores, probs, their gradient (f32)
    head = 3 * min(b * targets, cfg.loss_chunk) * cfg.vocab_size * 4    # one chunk's logits, softmax, gradient
    return int(saved + working + attention + head)


def plan(args) -> dict:
    import jax
    import jax.numpy as jnp
    from benchmarks.programs import train_config
    from moa_jax.config import MeshConfig, MoAConfig, replace
    from moa_jax.nn.model import MoATransformer
    from moa_jax.params import param_shapes, split_params
    from moa_jax.sharding import make_mesh, param_shardings
    from moa_jax.sharding import micro_batch_sharding
    from moa_jax.train.loop import jit_train_step, state_shardings
    from moa_jax.train.step import make_optimizer

    cfg = model_config(args.shape, args.dtype, args.remat, args.loss_chunk)
    if args.layers:
        cfg = replace(cfg, num_layers=args.layers)
    moa = MoAConfig(num_experts=args.experts, rank=args.rank, alpha=2.0 * args.rank)
    tcfg = replace(train_config("top1"), steps=1000)
    frozen, trainable = split_params(param_shapes(cfg, moa))
    if args.quantize != "none":
        # the int8 frozen tree (moa_jax/nn/quantize.py) in place of the bf16 one
        from moa_jax.nn.quantize import quantize_frozen
        cfg = replace(cfg, quantize=args.quantize)
        frozen = jax.eval_shape(quantize_frozen, frozen)
    fsdp = args.devices > 1
    mesh = make_mesh(MeshConfig(fsdp=fsdp), jax.devices()[:args.devices])
    tx = make_optimizer(tcfg, trainable)
    abstract_state, shards = state_shardings(mesh, tx, trainable)
    frozen_sh = param_shardings(mesh, frozen, fsdp)
    frozen_abs = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        frozen, frozen_sh)
    b, t, k = args.batch, args.seq, max(args.seq // 2, 1)
    shapes = {"tokens": (b, t), "loss_mask": (b, t), "prompt_mask": (b, t), "attention_mask": (b, t),
              "domain": (b,), "valid": (b,), "target_pos": (b, k), "target_tokens": (b, k), "target_weight": (b, k)}
    batch = {n: jax.ShapeDtypeStruct((1,) + s, jnp.int32, sharding=micro_batch_sharding(mesh, 1 + len(s)))
             for n, s in shapes.items()}
    step = jit_train_step(model=MoATransformer(cfg, moa), tcfg=tcfg, tx=tx, num_domains=args.experts, mesh=mesh,
                          state_shards=shards, frozen_shardings=frozen_sh)
    t0 = time.perf_counter()
    compiled = step.lower(abstract_state, frozen_abs, batch).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    arg, out, temp, alias = (int(getattr(m, f"{n}_size_in_bytes")) for n in ("argument", "output", "temp", "alias"))
    peak = arg + out + temp - alias
    params_b = _device_bytes(frozen_abs) + _device_bytes(abstract_state.trainable)
    opt_b = _device_bytes(abstract_state.opt_state)
    grads_b = _device_bytes(abstract_state.trainable)
    act_b = activation_estimate(cfg, moa, b, t, k, args.devices)
    analytic = params_b + opt_b + grads_b + act_b
    count = lambda tree: int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
    return {"shape": args.shape, "batch": b, "seq": t, "target_positions": k, "experts": args.experts,
            "rank": args.rank, "targets": len(moa.targets), "stage": "stage2", "dtype": args.dtype,
            "layers": cfg.num_layers, "xla_licm": args.xla_licm, "quantize": args.quantize, "remat": args.remat,
            "loss_chunk": args.loss_chunk, "devices": args.devices,
            "fsdp": fsdp, "backend": jax.default_backend(), "base_params": count(frozen),
            "adapter_params": count(trainable),
            "argument_bytes": arg, "output_bytes": out, "temp_bytes": temp, "alias_bytes": alias,
            "peak_bytes": peak, "peak_gib": round(peak / GIB, 2),
            "peak_definition": "argument + output + temp - alias, per device (compiled.memory_analysis())",
            "analytic": {"params_bytes": params_b, "optimizer_bytes": opt_b, "grads_bytes": grads_b,
                         "activations_bytes": act_b, "total_bytes": analytic, "total_gib": round(analytic / GIB, 2)},
            "compile_s": round(compile_s, 1)}


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax
    import numpy as np
    return int(sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def fail(message: str) -> None:
    print(f"benchmarks.memory: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.xla_licm:  # read when jax starts its backend (below): module docstring
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + NO_LICM).strip()
    if args.devices > 1:  # fake CPU devices: must precede jax's backend start (an already started one is refused below)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    if len(jax.devices()) < args.devices:
        fail(f"--devices {args.devices}: only {len(jax.devices())} {jax.default_backend()} devices are available")
    result = plan(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
