"""The JAX programs the suite times, built from the library's real entry points: the benchmark configs, batches,
the frozen fwd+bwd, `train_step` (optimiser included), forward logits and KV-cache decoding.

"Frozen fwd+bwd" (our definition, from the target table's "the backward a LoRA step needs minus the LoRA"): the
frozen base model's forward and the masked LM loss, differentiated w.r.t. the hidden activations entering the
first layer (the embedding output, perturbed by a zero tensor through a Flax method interceptor). That backward
propagates activation gradients through every layer and the head exactly as a LoRA step must, and computes no
weight gradient at all (the frozen kernels get none, and neither does the embedding table or a tied head).

Each `*_variant` returns a `timing.Variant` whose `run()` does one iteration and blocks on every output; the
train variant cycles through pre-placed batches with different domain mixes and feeds the donated state back.

Shape glossary: A micro-batches (1 here), B batch, T tokens, P prompt tokens, N new tokens, E experts, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moa_jax import flops
from benchmarks.timing import Variant, block, compile_aot, memory_info, xla_flops
from moa_jax.config import PROJECTIONS, ModelConfig, MoAConfig, TrainConfig
from moa_jax.generate.decode import decode_fn
from moa_jax.nn.model import MoATransformer
from moa_jax.params import merge_params, param_shapes, split_params
from moa_jax.train.step import init_state, lm_loss_terms, make_optimizer, train_step

KINDS = ("frozen", "single", "top1", "soft")   # the frozen base, one LoRA (E=1), MoA top-1, MoA soft


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration (BENCHMARKS.md "Running it")."""
    name: str
    model: ModelConfig
    batch: int
    seq: int
    rank: int = 8
    experts: int = 10
    targets: tuple = PROJECTIONS
    dropout: float = 0.0          # adapters' dropout in the train steps (PEFT side uses the same)
    decode_batch: int = 16
    decode_prompt: int = 32
    decode_new: int = 32

    @property
    def prompt_len(self) -> int:
        return self.seq // 2      # first half prompt (routed on), second half response (the loss)


def tiny_llama(vocab, d, ffn, layers, heads, kv_heads=None, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads or heads, **kw)


def cpu_tiny() -> BenchConfig:
    return BenchConfig("cpu-tiny", tiny_llama(2048, 256, 688, 4, 4), batch=16, seq=128)


def smoke() -> BenchConfig:
    """CI-sized: cpu-tiny widths (narrower ones make the LoRA terms, and so the ratios, several times noisier),
    2 layers, rank 4 (AdamW over 32 experts' state stays a small share of the step)."""
    return BenchConfig("smoke", tiny_llama(512, 256, 688, 2, 4), batch=8, seq=128, rank=4, decode_batch=8,
                       decode_prompt=16, decode_new=8)


def smollm2() -> BenchConfig:
    cfg = tiny_llama(49152, 576, 1536, 30, 9, 3, tie_word_embeddings=True, rope_theta=1e5)
    return BenchConfig("smollm2", cfg, batch=8, seq=128, rank=8)


def gpu_1b() -> BenchConfig:
    cfg = tiny_llama(32000, 2048, 5504, 16, 16, dtype="bfloat16", param_dtype="bfloat16")
    return BenchConfig("gpu-1b", cfg, batch=16, seq=1024, rank=16, decode_batch=16, decode_prompt=128,
                       decode_new=64)


def llama3_8b() -> ModelConfig:
    """Meta-Llama-3-8B's config.json (bf16)."""
    return tiny_llama(128256, 4096, 14336, 32, 32, 8, rope_theta=500000.0, max_position_embeddings=8192,
                      dtype="bfloat16", param_dtype="bfloat16", name="llama3-8b")


def qwen2_7b() -> ModelConfig:
    """Qwen2-7B's config.json (bf16; q/k/v bias, untied head)."""
    return tiny_llama(152064, 3584, 18944, 28, 28, 4, attention_bias=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      max_position_embeddings=32768, dtype="bfloat16", param_dtype="bfloat16", name="qwen2-7b")


def moa_config(bc: BenchConfig, kind: str, experts: Optional[int] = None, dropout: Optional[float] = None):
    """The MoAConfig of a variant (None for the frozen base). 'single' is top-1 with E=1: one LoRA, which the
    library runs on its flattened 2-D path (everything else identical to the MoA top-1 step)."""
    if kind not in KINDS:
        raise ValueError(f"unknown variant kind {kind!r}; valid: {KINDS}")
    if kind == "frozen":
        return None
    e = 1 if kind == "single" else (experts or bc.experts)
    return MoAConfig(num_experts=e, rank=bc.rank, alpha=2.0 * bc.rank, top_k=1, targets=bc.targets,
                     dropout=bc.dropout if dropout is None else dropout,
                     dispatch="soft" if kind == "soft" else "top1")


def train_config(kind: str) -> TrainConfig:
    """Stage 2 (experts + routers, router CE added) with label routing (top-1, single) or soft routing."""
    return TrainConfig(stage="stage2", steps=1000, train_routing="soft" if kind == "soft" else "label")


# ---------------------------------------------------------------- parameters and batches
def _fill(shapes, seed: int):
    """Random numpy values for a ShapeDtypeStruct tree (no XLA compile): kernels ~ N(0, 1/Din), embeddings
    N(0, 0.02^2), norms 1, biases 0, lora_a U(+-1/sqrt(Din)), lora_b and routers N(0, 0.02^2) (lora_b NOT zero,
    so adapters change the output and the PEFT parity check means something)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(path[-1].key)
        if name == "scale":
            return np.ones(s.shape, s.dtype)
        if name == "bias":
            return np.zeros(s.shape, s.dtype)
        if name == "lora_a":
            bound = 1.0 / np.sqrt(s.shape[-2])
            return rng.uniform(-bound, bound, s.shape).astype(s.dtype)
        std = 1.0 / np.sqrt(s.shape[-2]) if name == "kernel" and "router" not in str(path) else 0.02
        return (std * rng.standard_normal(s.shape, np.float32)).astype(s.dtype)
    return jax.device_put(jax.tree_util.tree_map_with_path(leaf, shapes))


@functools.lru_cache(maxsize=None)
def base_params(cfg: ModelConfig, seed: int = 0):
    """Random frozen base weights (shared by every variant of a config)."""
    return _fill(param_shapes(cfg, None), seed)


def adapter_params(bc: BenchConfig, moa: MoAConfig, seed: int = 1):
    """Experts + routers of `moa` (random, lora_b included)."""
    return _fill(split_params(param_shapes(bc.model, moa))[1], seed)


def make_batches(bc: BenchConfig, num_domains: int, count: int, seed: int = 0, batch: Optional[int] = None):
    """`count` batches [A=1, B, T] on device, each with its own random domain mix over `num_domains`."""
    rng = np.random.default_rng(seed)
    b, t, p = batch or bc.batch, bc.seq, bc.prompt_len
    pos = np.arange(t)[None, :].repeat(b, 0)
    out = []
    for _ in range(count):
        tokens = rng.integers(3, bc.model.vocab_size, (b, t), dtype=np.int32)
        out.append({"tokens": tokens, "loss_mask": (pos >= p).astype(np.int32),
                    "prompt_mask": (pos < p).astype(np.int32), "attention_mask": np.ones((b, t), np.int32),
                    "domain": rng.integers(0, num_domains, (b,), dtype=np.int32),
                    "valid": np.ones((b,), np.int32)})
    return [jax.device_put({k: v[None] for k, v in m.items()}) for m in out]


def for_experts(batches, num_experts: int):
    """The same batches with domain labels folded into [0, num_experts) (labels are expert ids)."""
    return [{**b, "domain": jax.device_put(np.asarray(b["domain"]) % num_experts)} for b in batches]


def _with_program_info(v: Variant, compiled, count) -> Variant:
    """Attach FLOPs and memory. count(cfg) -> analytic FLOPs of the program for a model config; XLA's cost
    analysis counts a scanned (while-loop) body once, so the cross-check compares XLA's number with the
    analytic count of the same program with ONE layer ('flops_analytic_1layer')."""
    one = dataclasses.replace(v.info.pop("cfg"), num_layers=1)
    v.info.update({"flops_analytic": count(None), "flops_analytic_1layer": count(one),
                   "flops_xla": xla_flops(compiled), "memory": memory_info(compiled), "compiled": compiled})
    return v


# ---------------------------------------------------------------- train steps
def frozen_loss_and_grad(model: MoATransformer, frozen, batch):
    """Frozen fwd+bwd of one micro-batch [B, T]: (loss, d loss / d embedding output [B, T, D])."""
    tokens = batch["tokens"]

    def loss(delta):
        def add_delta(fn, args, kwargs, ctx):
            out = fn(*args, **kwargs)
            is_embed = isinstance(ctx.module, nn.Embed) and ctx.method_name == "__call__"
            return out + delta if is_embed else out

        with nn.intercept_methods(add_delta):
            logits, _ = model.apply({"params": frozen}, tokens, attention_mask=batch["attention_mask"],
                                    routing="base")
        mask = batch["loss_mask"] * batch["valid"][:, None]
        nll, w, _, _ = lm_loss_terms(logits[:, :-1], tokens[:, 1:], mask[:, 1:], batch["domain"], 1)
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

    delta = jnp.zeros(tokens.shape + (model.cfg.hidden_size,), jnp.dtype(model.cfg.dtype))
    return jax.value_and_grad(loss)(delta)


def frozen_train_variant(bc: BenchConfig, name: str, batches) -> Variant:
    model = MoATransformer(bc.model, None)
    frozen = base_params(bc.model)
    fn = lambda frozen, batch: frozen_loss_and_grad(model, frozen, jax.tree_util.tree_map(lambda x: x[0], batch))
    jitted, compiled, cs = compile_aot(fn, frozen, batches[0])
    i = [0]

    def run():
        i[0] += 1
        return block(jitted(frozen, batches[i[0] % len(batches)]))
    count = lambda cfg: flops.train_flops(cfg or bc.model, bc.batch * bc.seq, bc.seq)
    return _with_program_info(Variant(name, run, cs, {"jitted": jitted, "cfg": bc.model}), compiled, count)


def train_variant(bc: BenchConfig, kind: str, name: str, batches, experts: Optional[int] = None,
                  dropout: Optional[float] = None) -> Variant:
    """The library's jitted `train_step` (AdamW, clipping, metrics), donated state, changing domain mixes."""
    if kind == "frozen":
        return frozen_train_variant(bc, name, batches)
    moa = moa_config(bc, kind, experts, dropout)
    tcfg = train_config(kind)
    batches = for_experts(batches, moa.num_experts)
    frozen = base_params(bc.model)
    trainable = adapter_params(bc, moa)
    tx = make_optimizer(tcfg, trainable)
    state = init_state(trainable, tx, seed=0)
    fn = functools.partial(train_step, model=MoATransformer(bc.model, moa), tcfg=tcfg, tx=tx,
                           num_domains=moa.num_experts)
    jitted, compiled, cs = compile_aot(fn, state, frozen, batches[0], donate_argnums=(0,))
    holder = {"state": state, "i": 0}

    def run():
        holder["i"] += 1
        holder["state"], metrics = jitted(holder["state"], frozen, batches[holder["i"] % len(batches)])
        return block((holder["state"], metrics))
    n_exp = moa.num_experts if kind == "soft" else 1
    count = lambda cfg: flops.train_flops(cfg or bc.model, bc.batch * bc.seq, bc.seq, bc.rank, moa.targets, n_exp)
    return _with_program_info(Variant(name, run, cs, {"jitted": jitted, "experts": moa.num_experts,
                                                      "cfg": bc.model}), compiled, count)


# ---------------------------------------------------------------- inference
def _routing(kind: str) -> str:
    return {"frozen": "base", "single": "fixed", "top1": "fixed", "soft": "soft"}[kind]


def infer_variant(bc: BenchConfig, kind: str, name: str, batches, experts: Optional[int] = None) -> Variant:
    """Forward logits [B, T, V] of a batch; top-1 uses each sequence's (mixed) domain as its expert."""
    moa = moa_config(bc, kind, experts)
    frozen = base_params(bc.model)
    params = frozen if moa is None else merge_params(frozen, adapter_params(bc, moa))
    batches = for_experts(batches, 1 if moa is None else moa.num_experts)
    model, routing = MoATransformer(bc.model, moa), _routing(kind)

    def fwd(params, tokens, attention_mask, prompt_mask, expert_idx):
        logits, _ = model.apply({"params": params}, tokens, attention_mask=attention_mask, prompt_mask=prompt_mask,
                                routing=routing, expert_idx=expert_idx)
        return logits
    args = [tuple(m[k][0] for k in ("tokens", "attention_mask", "prompt_mask", "domain")) for m in batches]
    jitted, compiled, cs = compile_aot(fwd, params, *args[0])
    i = [0]

    def run():
        i[0] += 1
        return block(jitted(params, *args[i[0] % len(args)]))
    n_exp = 0 if moa is None else (moa.num_experts if kind == "soft" else 1)
    count = lambda cfg: flops.forward_flops(cfg or bc.model, bc.batch * bc.seq, bc.seq, bc.rank, bc.targets, n_exp)
    return _with_program_info(Variant(name, run, cs, {"jitted": jitted, "cfg": bc.model}), compiled, count)


def decode_variant(bc: BenchConfig, kind: str, name: str, experts: Optional[int] = None, seed: int = 0) -> Variant:
    """Greedy KV-cache decoding (prefill + N-1 steps, one jitted while loop) of the library's generate path,
    EOS never hit; top-1 with a mixed expert per sequence. info['tokens'] = B * N new tokens per call."""
    moa = moa_config(bc, kind, experts)
    frozen = base_params(bc.model)
    params = frozen if moa is None else merge_params(frozen, adapter_params(bc, moa))
    b, p, n = bc.decode_batch, bc.decode_prompt, bc.decode_new
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(3, bc.model.vocab_size, (b, p), dtype=np.int32))
    mask = jnp.ones((b, p), jnp.int32)
    num_e = 1 if moa is None else moa.num_experts
    idxs = [jnp.asarray(rng.integers(0, num_e, (b,), dtype=np.int32)) for _ in range(4)]
    mode = "base" if moa is None else ("soft" if kind == "soft" else "fixed")
    decode = decode_fn(bc.model, moa, mode, n, True)
    rest = (jnp.asarray([-1], jnp.int32), jnp.float32(1.0), jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    compiled = decode.lower(params, tokens, mask, idxs[0], *rest).compile()
    cs = time.perf_counter() - t0
    i = [0]

    def run():
        i[0] += 1
        return block(decode(params, tokens, mask, idxs[i[0] % len(idxs)], *rest))
    n_exp = 0 if moa is None else (moa.num_experts if kind == "soft" else 1)
    # XLA counts the decode while loop once too: one layer, prefill + ONE step
    count = lambda cfg: (flops.decode_flops(bc.model, b, p, n, bc.rank, bc.targets, n_exp) if cfg is None else
                         flops.decode_flops(cfg, b, p, 2, bc.rank, bc.targets, n_exp))
    return _with_program_info(Variant(name, run, cs, {"jitted": decode, "tokens": b * n, "cfg": bc.model}),
                              compiled, count)


def small_head_train_variant(bc: BenchConfig, name: str, batches, rows: int = 128) -> Variant:
    """`train_variant(kind='single')` of the same model with a `rows`-row vocabulary (tokens taken mod `rows`):
    identical layers, a head of `rows` rows; the time it saves is the share of the full head + loss + backward."""
    small = dataclasses.replace(bc, model=dataclasses.replace(bc.model, vocab_size=rows))
    return train_variant(small, "single", name, [{**b, "tokens": b["tokens"] % rows} for b in batches])
