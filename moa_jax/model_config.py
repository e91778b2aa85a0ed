"""ModelConfig: the decoder's architecture (Llama, Mistral, Qwen2/3, Gemma 3 text) and how its frozen base is
stored and run (dtypes, int8, remat, loss blocks); moa_jax.config re-exports it with the other configs.

Shape glossary: D model width, F MLP width, H query heads, K key/value heads, Dh head width, L layers, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moa_jax.config_fields import REQUIRED, setting
from moa_jax.errors import require as _check

# Canonical projection names (Hugging Face / PEFT naming); moa_jax.config maps the short forms users may write.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = PROJECTIONS[:4]

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE_MODES = ("none", "int8")  # storage of the frozen projection kernels (moa_jax/nn/quantize.py)
# What each decoder layer keeps for the backward (moa_jax/nn/model.py, REMAT POLICIES); none of them keeps a T^2 tensor.
REMAT_POLICIES = ("auto", "full", "projections", "none")
HIDDEN_ACTS = ("silu", "gelu_tanh")   # the gated MLP's activation: SwiGLU (Llama, Qwen) | GeGLU (Gemma)
LAYER_TYPES = ("full_attention", "sliding_attention")   # Hugging Face `layer_types` entries


def check_remat(value: str, where: str) -> None:
    _check(value in REMAT_POLICIES, f"{where}.remat={value!r} is not one of {REMAT_POLICIES}: 'full' keeps only each "
           f"layer's input (least memory, ~1 extra forward), 'projections' keeps the projection outputs (faster, "
           f"~O(L*B*T*(4D+3F)) more memory), 'none' keeps every residual, 'auto' = projections on CPU, full elsewhere")


@dataclass(frozen=True)
class RopeScaling:
    """Hugging Face `rope_scaling` of type "llama3" (Llama 3.1+); "linear" (e.g. Gemma 3's global layers) too."""
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
    """A Llama-family decoder: Llama 2/3, Mistral, Qwen2 (qkv bias), SmolLM2 (tied embeddings), Qwen3 (q/k norms,
    explicit head_dim) and Gemma 3 text (the fields from qk_norm on; moa_jax/nn/model.py says where each acts)."""
    vocab_size: int = setting(REQUIRED, "shape")
    hidden_size: int = setting(REQUIRED, "shape")   # D
    intermediate_size: int      # F
    num_layers: int = setting(REQUIRED, "shape")    # L
    num_heads: int              # H
    num_kv_heads: int           # K
    head_dim_override: Optional[int] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    max_position_embeddings: int = 4096
    sliding_window: Optional[int] = None  # Mistral: keys further back than this are masked
    dtype: str = "float32"        # compute dtype
    param_dtype: str = "float32"  # storage dtype of the frozen base weights
    quantize: str = "none"        # "int8": projection kernels int8 + per-channel scales (moa_jax/nn/quantize.py)
    remat: str = "auto"           # REMAT_POLICIES: what each layer keeps for the backward (model.py)
    loss_chunk: int = 1024        # LM loss / NLL: tokens per block of the chunked head (no [B, T, V] logits)
    name: str = "llama"
    # Qwen3 / Gemma 3 (all off for the Llama family):
    qk_norm: bool = setting(False, "shape")   # per-head RMSNorm on q and k before RoPE (attn/q_norm, attn/k_norm [Dh])
    norm_unit_offset: bool = False  # Gemma: every RMSNorm scales by (1 + w), in float32, then casts
    sandwich_norms: bool = setting(False, "shape")   # Gemma: norms on the attention and MLP outputs (four per layer)
    hidden_act: str = "silu"      # HIDDEN_ACTS: the gated MLP's activation (Gemma: tanh-approximated GELU)
    embed_scale: bool = False     # Gemma: embeddings times sqrt(D), in the compute dtype
    query_pre_attn_scalar: Optional[float] = None  # Gemma: attention scale is this**-0.5 (default Dh**-0.5)
    layer_types: Optional[tuple] = None  # LAYER_TYPES per layer; None = every layer alike (sliding_window for all)
    rope_local_theta: Optional[float] = None  # RoPE base of the sliding layers, unscaled (Gemma 3's 10k);
                                              # None: they use rope_theta / rope_scaling like the others

    def __post_init__(self):
        if self.layer_types is not None:  # a JSON round trip gives a list; frozen configs must stay hashable
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            _check(len(self.layer_types) == self.num_layers,
                   f"ModelConfig.layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}")
            bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
            _check(not bad, f"ModelConfig.layer_types: unknown entries {bad} (supported: {list(LAYER_TYPES)})")
            _check("sliding_attention" not in self.layer_types or self.sliding_window is not None,
                   "ModelConfig.layer_types has sliding_attention layers but sliding_window is None")
        _check(self.hidden_act in HIDDEN_ACTS, f"ModelConfig.hidden_act={self.hidden_act!r} not in {HIDDEN_ACTS}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _check(getattr(self, field) > 0, f"ModelConfig.{field} must be > 0, got {getattr(self, field)}")
        _check(self.num_heads % self.num_kv_heads == 0,
               f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        _check(self.head_dim_override is not None or self.hidden_size % self.num_heads == 0,
               f"ModelConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        _check(self.dtype in DTYPES, f"ModelConfig.dtype={self.dtype!r} not in {DTYPES}")
        _check(self.param_dtype in DTYPES, f"ModelConfig.param_dtype={self.param_dtype!r} not in {DTYPES}")
        check_remat(self.remat, "ModelConfig")
        _check(self.loss_chunk >= 1, f"ModelConfig.loss_chunk must be >= 1, got {self.loss_chunk}")
        _check(self.quantize in QUANTIZE_MODES, f"ModelConfig.quantize={self.quantize!r} not in {QUANTIZE_MODES}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def per_layer_attention(self) -> bool:
        """Layers differ in window or RoPE (layer_types): the model scans per-layer windows and frequencies."""
        return self.layer_types is not None

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(D_in, D_out) of one projection, by canonical name."""
        d, f, dh = self.hidden_size, self.intermediate_size, self.head_dim
        return {"q_proj": (d, self.num_heads * dh), "k_proj": (d, self.num_kv_heads * dh),
                "v_proj": (d, self.num_kv_heads * dh), "o_proj": (self.num_heads * dh, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}[name]
