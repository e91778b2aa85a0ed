"""Named entry points into the MoA decoder (moa_jax/nn/model.py): callers say what they want from the model (the
NLL of some next tokens, a routing pass, logits, a cached forward) over one input structure, instead of assembling
the decoder's dozen keyword arguments at every call site.

    x = ModelInputs.of(batch)                                  # tokens, masks, packed segments of a batch
    nll, aux = lm_nll(model, params, x, at, targets, mode=plan.mode, expert_idx=idx, rng=rng)
    router_logits = routing_pass(model, params, x, mode="probe")
    logits, aux = forward(model, params, x, mode=plan.mode, expert_idx=idx, cache=cache)

`mode` is a RoutePlan's mode (moa_jax/routing.py resolves requests into plans); `expert_idx` [B] is what the plan
needs when it forces one expert per sequence.

Shape glossary: B batch, T tokens, K target positions, L layers, E experts, V vocab, G segments of a packed row.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from moa_jax.nn.model import MoATransformer

Array = jax.Array


class ModelInputs(NamedTuple):
    """What every entry point reads of a batch.

    tokens [B, T]; attention_mask [B, T] (1 on real tokens); prompt_mask [B, T] (the tokens the routers pool;
    None = attention_mask); segment_ids [B, T] with num_segments G for packed rows (moa_jax/data/packing.py);
    right_padded: every row's padding is at its end (training and evaluation batches; lets a GPU use flash
    attention), False for left-padded prompts.
    """
    tokens: Array
    attention_mask: Array
    prompt_mask: Optional[Array] = None
    segment_ids: Optional[Array] = None
    num_segments: int = 0
    right_padded: bool = False

    @classmethod
    def of(cls, batch: dict) -> "ModelInputs":
        """A right-padded batch dict (moa_jax/data/pipeline.py, packed rows included)."""
        packed = "segment_ids" in batch
        return cls(batch["tokens"], batch["attention_mask"], batch["prompt_mask"],
                   batch["segment_ids"] if packed else None,
                   batch["segment_valid"].shape[-1] if packed else 0, right_padded=True)

    def model_kwargs(self) -> dict[str, Any]:
        out = {"attention_mask": self.attention_mask, "prompt_mask": self.prompt_mask,
               "right_padded": self.right_padded}
        if self.segment_ids is not None:
            out.update(segment_ids=self.segment_ids, num_segments=self.num_segments)
        return out


def lm_nll(model: MoATransformer, params, x: ModelInputs, at: Array, targets: Array, *, mode: str,
           expert_idx: Optional[Array] = None, rng: Optional[Array] = None) -> tuple[Array, dict]:
    """NLL [B, K] f32 of `targets` [B, K] predicted at positions `at` [B, K], computed in token blocks (no
    [B, K, V] logits), and the aux dict (router_logits, balance_loss). `rng`: dropout on (training)."""
    return model.apply({"params": params}, x.tokens, routing=mode, expert_idx=expert_idx,
                       deterministic=rng is None, rngs={} if rng is None else {"dropout": rng},
                       logits_at=at, nll_targets=targets, **x.model_kwargs())


def routing_pass(model: MoATransformer, params, x: ModelInputs, *, mode: str, exit_layer: int = 0) -> Array:
    """Router logits [L, B, E] ([L, B, G, E] for packed rows) of a routing pass in `mode` ('self' or 'probe');
    the LM head runs at one position only. exit_layer k (1..L; 0 = L): the pass stops after layer k, running the
    first k layers only (early exit) -> logits [k, B, E], equal to the full pass's first k."""
    at = jnp.zeros((x.tokens.shape[0], 1), jnp.int32)
    if 0 < exit_layer < model.cfg.num_layers:
        model, params = early_exit_model(model, params, exit_layer)
    _, aux = model.apply({"params": params}, x.tokens, routing=mode, logits_at=at, **x.model_kwargs())
    return aux["router_logits"]


def early_exit_model(model: MoATransformer, params, layers: int) -> tuple[MoATransformer, Any]:
    """The decoder cut after its first `layers` layers (config and parameters [L, ...] -> [layers, ...]); the
    final norm and LM head stay (a routing pass reads them at one position)."""
    cfg = model.cfg
    short = dataclasses.replace(cfg, num_layers=layers,
                                layer_types=None if cfg.layer_types is None else cfg.layer_types[:layers])
    cut = dict(params, layers=jax.tree_util.tree_map(lambda a: a[:layers], params["layers"]))
    return MoATransformer(short, model.moa), cut


def forward(model: MoATransformer, params, x: ModelInputs, *, mode: str, expert_idx: Optional[Array] = None,
            cache: Optional[dict] = None) -> tuple[Array, dict]:
    """Logits [B, T, V] f32 and the aux dict; with a KV `cache` (moa_jax/nn/model.init_cache) the prefill or a
    decode step, aux["cache"] the updated cache."""
    return model.apply({"params": params}, x.tokens, routing=mode, expert_idx=expert_idx, cache=cache,
                       **x.model_kwargs())
