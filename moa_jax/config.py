"""Frozen configuration dataclasses: the one source of truth for every setting in moa_jax.

One dataclass per concern; each module receives only its own sub-config. Frozen dataclasses are hashable, so
they can be static arguments of `jax.jit`. Presets are functions returning instances; derived values are
properties. Paper defaults that the paper leaves open are marked [ours] (see shared/paper.md) and are all options.

Shape glossary used across the package:
  B batch, T tokens, S cache slots, D model width, F MLP width, H query heads, K key/value heads, Dh head width,
  E experts, R LoRA rank, L layers, V vocabulary.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

# Canonical projection names (Hugging Face / PEFT naming) and the short aliases users may write.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = PROJECTIONS[:4]
_PROJECTION_ALIASES = {p.removesuffix("_proj"): p for p in PROJECTIONS}

DISPATCH_MODES = ("top1", "soft", "token_topk")
ROUTER_TYPES = ("linear", "mlp")
DECISION_POLICIES = ("last", "vote")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class RopeScaling:
    """Hugging Face `rope_scaling` of type "llama3" (Llama 3.1+); "linear" is also accepted."""
    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        _check(self.rope_type in ("llama3", "linear"),
               f"rope_scaling.rope_type={self.rope_type!r} is not supported (supported: 'llama3', 'linear')")


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: Llama 2/3, Mistral, Qwen2 (qkv bias), SmolLM2 (tied embeddings)."""
    vocab_size: int
    hidden_size: int            # D
    intermediate_size: int      # F
    num_layers: int             # L
    num_heads: int              # H
    num_kv_heads: int           # K
    head_dim_override: Optional[int] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    max_position_embeddings: int = 4096
    sliding_window: Optional[int] = None  # Mistral; only checked against, see model.py
    dtype: str = "float32"        # compute dtype
    param_dtype: str = "float32"  # storage dtype of the frozen base weights
    scan_layers: bool = True      # lax.scan over layers: compile time flat in L
    remat: bool = False           # rematerialise each layer in the backward pass
    name: str = "llama"

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _check(getattr(self, field) > 0, f"ModelConfig.{field} must be > 0, got {getattr(self, field)}")
        _check(self.num_heads % self.num_kv_heads == 0,
               f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        _check(self.head_dim_override is not None or self.hidden_size % self.num_heads == 0,
               f"ModelConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        _check(self.dtype in DTYPES, f"ModelConfig.dtype={self.dtype!r} not in {DTYPES}")
        _check(self.param_dtype in DTYPES, f"ModelConfig.param_dtype={self.param_dtype!r} not in {DTYPES}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(D_in, D_out) of one projection, by canonical name."""
        d, f, dh = self.hidden_size, self.intermediate_size, self.head_dim
        return {"q_proj": (d, self.num_heads * dh), "k_proj": (d, self.num_kv_heads * dh),
                "v_proj": (d, self.num_kv_heads * dh), "o_proj": (self.num_heads * dh, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}[name]


def normalize_targets(targets) -> tuple[str, ...]:
    """Accepts 'q' or 'q_proj' style names (or 'all'); returns canonical names in model order."""
    if isinstance(targets, str):
        targets = PROJECTIONS if targets == "all" else tuple(t.strip() for t in targets.split(",") if t.strip())
    out = []
    for t in targets:
        canon = _PROJECTION_ALIASES.get(t, t)
        _check(canon in PROJECTIONS, f"MoAConfig.targets: unknown projection {t!r}; valid: {list(PROJECTIONS)} "
               f"or their short forms {list(_PROJECTION_ALIASES)}")
        out.append(canon)
    _check(len(out) > 0, "MoAConfig.targets is empty: name at least one projection")
    return tuple(p for p in PROJECTIONS if p in out)


@dataclass(frozen=True)
class MoAConfig:
    """The LoRA experts and the per-layer routers (paper Sec. 3)."""
    num_experts: int = 10         # E; E=1 is a plain LoRA
    rank: int = 16                # R
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple = PROJECTIONS  # [ours] all seven projections
    use_rslora: bool = False      # scale alpha/sqrt(R) instead of alpha/R
    dispatch: str = "top1"        # top1 per sequence | soft per sequence | token_topk (MoE-LoRA baseline)
    top_k: int = 2                # token_topk only
    router_type: str = "linear"   # [ours] bias-free linear; 'mlp' = two-layer MLP
    router_hidden: int = 256      # mlp router only
    decision: str = "last"        # inference policy: last router (paper) | vote over layers
    adapter_dtype: str = "float32"  # storage dtype of experts and routers (master weights)

    def __post_init__(self):
        object.__setattr__(self, "targets", normalize_targets(self.targets))
        _check(self.num_experts >= 1, f"MoAConfig.num_experts must be >= 1, got {self.num_experts}")
        _check(self.rank >= 1, f"MoAConfig.rank must be >= 1, got {self.rank}")
        _check(0.0 <= self.dropout < 1.0, f"MoAConfig.dropout must be in [0, 1), got {self.dropout}")
        _check(self.dispatch in DISPATCH_MODES, f"MoAConfig.dispatch={self.dispatch!r} not in {DISPATCH_MODES}")
        _check(self.router_type in ROUTER_TYPES, f"MoAConfig.router_type={self.router_type!r} not in {ROUTER_TYPES}")
        _check(self.decision in DECISION_POLICIES,
               f"MoAConfig.decision={self.decision!r} not in {DECISION_POLICIES}")
        _check(self.top_k >= 1, f"MoAConfig.top_k must be >= 1, got {self.top_k}")
        # top_k is used only by token_topk; checking it otherwise would reject E=1 (a plain LoRA) at top_k=2.
        _check(self.dispatch != "token_topk" or self.top_k <= self.num_experts,
               f"MoAConfig.top_k={self.top_k} must be <= num_experts={self.num_experts} for dispatch='token_topk'")
        _check(self.adapter_dtype in DTYPES, f"MoAConfig.adapter_dtype={self.adapter_dtype!r} not in {DTYPES}")

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.use_rslora else self.rank)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: ('data', 'expert') axes; -1 means 'all remaining devices'."""
    data: int = -1
    expert: int = 1


def replace(cfg, **changes):
    """dataclasses.replace that re-runs validation (frozen dataclasses)."""
    return dataclasses.replace(cfg, **changes)
