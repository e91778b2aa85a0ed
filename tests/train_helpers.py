"""Shared helpers for the training tests (and their subprocess workers): a tiny model, a synthetic batch source
whose batch(index) is a pure function of index, and a `train_stage` call with a 1-device or N-device mesh.

Shape glossary: B batch, T tokens, V vocab, N domains, E experts, L layers.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.experimental.compilation_cache import compilation_cache

from moa_jax.config import MeshConfig, ModelConfig, MoAConfig, TrainConfig
from moa_jax.nn.model import MoATransformer
from moa_jax.params import init_params, merge_params, param_shapes, split_params
from moa_jax.sharding import make_mesh, param_shardings, put_params
from moa_jax.train.loop import train_stage

VOCAB, SEQ = 64, 16


def tiny_cfg():
    """D=32, F=64, L=2, H=4 over K=2 kv heads, V=64."""
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, max_position_embeddings=64, name="tiny-train-test")


def tiny_moa(num_experts: int = 2, rank: int = 4, targets=("q_proj", "v_proj", "down_proj"), dropout: float = 0.0):
    return MoAConfig(num_experts=num_experts, rank=rank, alpha=2.0 * rank, dropout=dropout, targets=targets)


def config_dict(cfg, moa, tcfg) -> dict:
    """The resolved-config JSON a stage checkpoint carries (the fields checkpoint.MUST_MATCH reads)."""
    return {"model": {"source": "tiny-random-test", **dataclasses.asdict(cfg)}, "moa": dataclasses.asdict(moa),
            "train": dataclasses.asdict(tcfg)}


def init_trees(cfg, moa, seed: int = 0):
    """-> (frozen, trainable) numpy trees of a random tiny model, drawn in numpy from the abstract param tree
    (no compilation). lora_b is non-zero so that every parameter (lora_a included) has a gradient from step 1."""
    rng = np.random.default_rng(seed)
    flat = {}
    for k, v in sorted(traverse_util.flatten_dict(param_shapes(cfg, moa)).items()):
        name, shape = k[-1], tuple(v.shape)
        if name == "scale":
            x = np.ones(shape)
        elif name == "bias":
            x = np.zeros(shape)
        elif name == "embedding":
            x = rng.standard_normal(shape)
        elif name == "lora_a":
            x = rng.uniform(-1.0, 1.0, shape) / np.sqrt(shape[-2])
        elif name == "lora_b":
            x = 0.02 * rng.standard_normal(shape)
        else:                                                     # kernels [..., Din, Dout]
            x = rng.standard_normal(shape) / np.sqrt(shape[-2])
        flat[k] = x.astype(v.dtype)
    return split_params(traverse_util.unflatten_dict(flat))


class SyntheticSource:
    """Global batch `index` is a pure function of (seed, index); host p of P gets rows [p*B/P, (p+1)*B/P).

    Every global batch holds exactly B/N rows of each of the N domains (in a random order): stage-1 equivalence
    needs every domain in every batch. Each sequence is an arithmetic progression mod V whose stride depends on
    the domain: the first half is the prompt (router input), the second half the response (loss). With
    `pool` set, only `pool` distinct batches exist (index % pool): a dataset small enough to memorise.
    `domain_mix(index)` may override the per-batch domain assignment (changing mixes; then B/N is not enforced).
    """

    def __init__(self, batch_size: int = 8, num_domains: int = 2, seq_len: int = SEQ, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, pool: Optional[int] = None,
                 domain_mix=None, bad_from: Optional[int] = None):
        assert batch_size % num_domains == 0 and batch_size % process_count == 0
        self.b, self.n, self.t, self.seed, self.pool = batch_size, num_domains, seq_len, seed, pool
        self.p, self.np_ = process_index, process_count
        self.domain_mix, self.bad_from = domain_mix, bad_from

    def global_batch(self, index: int) -> dict[str, np.ndarray]:
        key = index % self.pool if self.pool else index
        rng = np.random.default_rng([self.seed, key])
        domain = rng.permutation(np.arange(self.b) % self.n).astype(np.int32)                  # (B,)
        if self.domain_mix is not None:
            domain = np.asarray(self.domain_mix(index), np.int32)
        start = rng.integers(0, VOCAB, self.b)
        stride = 1 + 2 * domain                                                                 # odd: a cycle of V
        pos = np.arange(self.t)
        tokens = ((start[:, None] + stride[:, None] * pos[None]) % VOCAB).astype(np.int32)      # (B, T)
        length = rng.integers(self.t - 3, self.t + 1, self.b)                                  # right padding
        attention = (pos[None] < length[:, None]).astype(np.int32)
        tokens = tokens * attention
        prompt = (pos[None] < self.t // 2).astype(np.int32) * attention
        loss = (pos[None] >= self.t // 2).astype(np.int32) * attention
        if self.bad_from is not None and index >= self.bad_from:
            tokens[0, 1] = VOCAB + 7  # out-of-range id: the embedding lookup fills NaN
        return {"tokens": tokens, "loss_mask": loss, "prompt_mask": prompt, "attention_mask": attention,
                "domain": domain, "valid": np.ones(self.b, np.int32)}

    def batch(self, index: int) -> dict[str, np.ndarray]:
        rows = slice(self.p * self.b // self.np_, (self.p + 1) * self.b // self.np_)
        return {k: v[rows] for k, v in self.global_batch(index).items()}


def make_train_config(**changes):
    # router_lr_mult pinned, so these float-trajectory equivalence tests (1e-5) never follow a change of the library
    # default. (The one 2-process vs 1-process failure seen so far was the library default changing from 10 to 1
    # while the suite ran: the reference and the worker processes imported different defaults.)
    base = dict(stage="stage2", steps=4, learning_rate=1e-2, warmup_frac=0.0, log_every=1, checkpoint_every=1000,
                keep_checkpoints=2, seed=0, router_lr_mult=1.0)
    return TrainConfig(**{**base, **changes})


def run_stage(workdir, tcfg, moa, source, mesh_cfg=None, devices=None, on_log=None, config=None, validation=None):
    """train_stage of the tiny model from init_trees on a mesh (default: one device), validating on `validation`
    (a source like `source`) when tcfg.eval_every asks -> (final trainable numpy tree, history)."""
    cfg = tiny_cfg()
    frozen, trainable = init_trees(cfg, moa)
    devices = jax.devices()[:1] if devices is None and mesh_cfg is None else devices
    mesh = make_mesh(mesh_cfg or MeshConfig(data=1, expert=1), devices)
    frozen_dev = put_params(frozen, param_shardings(mesh, frozen))
    domains = [f"d{i}" for i in range(moa.num_experts)]
    return train_stage(model=MoATransformer(cfg, moa), tcfg=tcfg, mesh=mesh, frozen=frozen_dev, trainable=trainable,
                       source=source, workdir=os.fspath(workdir), config=config or config_dict(cfg, moa, tcfg),
                       domain_names=domains, progress=False, on_log=on_log, validation=validation)


def flat_np(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def max_abs_diff(a, b) -> float:
    fa, fb = flat_np(a), flat_np(b)
    assert fa.keys() == fb.keys(), (sorted(fa), sorted(fb))
    return max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)


# ---- the configurations shared by a test and its subprocess worker ----

def standard_setup(**changes):
    """The configuration most training tests share (so the persistent compilation cache can reuse programs):
    stage 2, E=2 experts (q/v/down), 4 steps, batch 8. -> (TrainConfig, MoAConfig)."""
    return make_train_config(**changes), tiny_moa()


def resume_setup(steps: int):
    """Kill-and-resume: dropout on (the RNG must be restored too), 2 micro-batches per update (the data position
    must be restored too), a checkpoint every step. -> (TrainConfig, MoAConfig, source)."""
    tcfg = make_train_config(steps=steps, grad_accum=2, checkpoint_every=1, keep_checkpoints=2)
    return tcfg, tiny_moa(dropout=0.1), SyntheticSource(batch_size=4)


def no_tensorboard() -> None:
    """Make `import tensorboardX` fail in a worker process: the metrics logger then writes JSONL only. tensorboardX
    imports torch when it is installed (~5 s of start-up per process), and TensorBoard output is not under test."""
    sys.modules.setdefault("tensorboardX", None)


def randomised_model(cfg, moa, router_scale: float, seed: int = 0):
    """Full params of a random base whose adapters are drawn large enough that experts differ (lora_b is zero at
    init) and whose routers (scale `router_scale`) send different inputs to different experts."""
    frozen, trainable = split_params(jax.device_get(init_params(cfg, moa, jax.random.PRNGKey(seed))))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(trainable)
    for k, v in flat.items():
        scale = 0.5 if k[-1] == "lora_b" else router_scale if "router" in k else 0.3
        flat[k] = (rng.standard_normal(v.shape) * scale).astype(np.float32)
    return merge_params(frozen, traverse_util.unflatten_dict(flat))


# ---- subprocess workers and the persistent compilation cache they share with the test module ----
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_OPTIONS = {"jax_compilation_cache_dir": None, "jax_persistent_cache_min_compile_time_secs": 0.0,
                 "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A fresh persistent compilation cache for this module (also handed to the subprocess workers)."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    old = {k: getattr(jax.config, k) for k in CACHE_OPTIONS}
    for k, v in {**CACHE_OPTIONS, "jax_compilation_cache_dir": path}.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
    yield path
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def worker_env(cache_dir, **extra):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=ROOT, **extra)
    return env


def finalized_steps(ckpt_dir):
    """Checkpoint steps orbax has finished (temporary directories carry a suffix and are not counted)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
