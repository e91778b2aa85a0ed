"""The analytic FLOP model (BENCHMARKS.md "How to read the numbers"), for the programs the suite times (matmuls only).

Per adapted projection and token the base costs 2*Din*Dout and a LoRA expert 2*R*(Din+Dout). Attention costs
4*S*H*Dh per token and layer (scores and values over all S key slots: the masked half is computed too), the LM
head 2*D*V per token. Backward passes:
  frozen fwd+bwd   gradients w.r.t. activations only (what a LoRA step needs besides the LoRA): projections and
                   head 1x their forward (dX), attention 2x (dQ and dK from the scores, dP and dV from the values).
  LoRA             dX, dA and dB: 2x its forward, so a LoRA train step adds 3x its forward: the (1 + 1.5 f) of
                   the target table with f = R(Din+Dout)/(Din*Dout).
  soft mixture     the adapter term times E (rank-concat: x @ [Din, E*R]); top-1 gather: one expert's cost.
Routers, norms, softmaxes and the optimiser are left out (they are not matmuls; the optimiser is O(params)).

Shape glossary: B batch, T tokens, S key slots, D width, V vocab, L layers, E experts, R rank.
"""
from __future__ import annotations

from moa_jax.config import ModelConfig


def projection_flops(cfg: ModelConfig) -> float:
    """Base matmul FLOPs of one token through one layer's seven projections."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return sum(2.0 * din * dout for din, dout in map(cfg.projection_shape, names))


def lora_flops(cfg: ModelConfig, rank: int, targets: tuple[str, ...]) -> float:
    """Forward FLOPs of ONE expert's low-rank delta, one token, one layer, over the adapted projections."""
    return sum(2.0 * rank * (din + dout) for din, dout in map(cfg.projection_shape, targets))


def lora_fraction(cfg: ModelConfig, rank: int, targets: tuple[str, ...]) -> float:
    """The cost model's f, over the adapted projections: LoRA FLOPs / base projection FLOPs."""
    base = sum(2.0 * din * dout for din, dout in map(cfg.projection_shape, targets))
    return lora_flops(cfg, rank, targets) / base


def attention_flops(cfg: ModelConfig, slots: int) -> float:
    return 4.0 * slots * cfg.num_heads * cfg.head_dim


def head_flops(cfg: ModelConfig) -> float:
    return 2.0 * cfg.hidden_size * cfg.vocab_size


def forward_flops(cfg: ModelConfig, tokens: int, slots: int, rank: int = 0, targets: tuple = (),
                  experts_computed: int = 0) -> float:
    """One forward over `tokens` tokens attending over `slots` slots; `experts_computed` adapter terms per token
    (0 = frozen base, 1 = single LoRA / top-1, E = soft mixture)."""
    per_layer = projection_flops(cfg) + attention_flops(cfg, slots)
    if experts_computed:
        per_layer += experts_computed * lora_flops(cfg, rank, targets)
    return tokens * (cfg.num_layers * per_layer + head_flops(cfg))


def train_flops(cfg: ModelConfig, tokens: int, slots: int, rank: int = 0, targets: tuple = (),
                experts_computed: int = 0) -> float:
    """Forward + the backward a LoRA step needs (activations; LoRA weights when adapted)."""
    frozen = tokens * (cfg.num_layers * (2 * projection_flops(cfg) + 3 * attention_flops(cfg, slots))
                       + 2 * head_flops(cfg))
    if experts_computed:
        frozen += tokens * cfg.num_layers * 3 * experts_computed * lora_flops(cfg, rank, targets)
    return frozen


def decode_flops(cfg: ModelConfig, batch: int, prompt: int, new: int, rank: int = 0, targets: tuple = (),
                 experts_computed: int = 0) -> float:
    """Prefill of `prompt` tokens + (new - 1) single-token steps, each attending over all P + N cache slots."""
    slots = prompt + new
    pre = forward_flops(cfg, batch * prompt, slots, rank, targets, experts_computed)
    step = forward_flops(cfg, batch, slots, rank, targets, experts_computed)
    return pre + (new - 1) * step
