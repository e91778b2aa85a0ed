"""The routing vocabulary of the whole package and its one translation into the model's routing modes.

Three vocabularies name who picks the experts, each at its own level:
  ROUTINGS        what a user asks for (generate()/logits() routing=, `python -m moa_jax.cli.generate --routing`):
                  router  the model's routers decide (how depends on MoAConfig.dispatch)
                  oracle  the domain label of each sequence picks its expert
                  forced  one expert for every sequence
                  base    adapters off
  TRAIN_ROUTINGS  the forward of a training stage (TrainConfig.train_routing, read in stage 2):
                  label   teacher forcing: the domain label picks the expert
                  router  each layer's own router argmax (top-1 per sequence), or token-level top-k for token_topk
                  soft    the per-sequence mixture softmax(router logits)
  MODES           the model's static `routing` argument (moa_jax/nn/model.py):
                  base (adapters off), fixed (top-1 with a given expert [B]), self (each layer's own argmax),
                  soft (per-sequence mixture), token (token-level top-k with a balance loss),
                  probe (adapters off, every router read on the base hidden state: the servable routing pass)
`model_mode` is the only translation from the first two to the third; `MODE_TABLE` spells it out per dispatch.
The routing pass that decides a top-1 expert from the prompt runs `routing_pass_mode(moa)`: 'self' (the adapted
model, MoAConfig.route_on='adapted', the paper's) or 'probe' (the plain base model, route_on='base', servable).
Inside a layer each mode becomes a ROUTE_KINDS kind of moa_jax/nn/lora.Route (how the LoRA delta is computed):
base, probe -> base; fixed, self -> top1 (single when E = 1); soft, token -> mixture; single is also one expert shared
by the whole batch.

MoAConfig.dispatch (DISPATCH_MODES) says how the routers pick when they decide: top1 (one expert per sequence,
chosen once from the prompt and then forced with 'fixed'), soft (per-sequence mixture), token_topk (MoE-LoRA).
MoAConfig.decision (DECISION_POLICIES) says which routers decide a top-1 expert at inference: the last layer's
or a vote over layers.

This module imports nothing from moa_jax, so every layer can use it.

Shape glossary: B batch (sequences), T tokens, E experts.
"""
from __future__ import annotations

DISPATCH_MODES = ("top1", "soft", "token_topk")
DECISION_POLICIES = ("last", "vote")
# Where the routers read at inference (MoAConfig.route_on): "adapted" = the routing pass of the adapted model (each
# layer routed by its own router), "base" = one plain forward of the base model, no adapters (servable: a server
# routes with its base model, then names the PEFT adapter; moa_jax/reference_router.py).
ROUTE_ON = ("adapted", "base")
ROUTINGS = ("router", "oracle", "forced", "base")
TRAIN_ROUTINGS = ("label", "router", "soft")
MODES = ("base", "fixed", "self", "probe", "soft", "token")
ROUTE_KINDS = ("base", "single", "top1", "mixture")

# (routing, training?) -> model mode under each dispatch, in DISPATCH_MODES order (top1, soft, token_topk).
# Inference 'router' with top1 is 'fixed': the expert comes from a routing pass over the prompt ('self' mode,
# generate/decode.route_from_prompt) and is then forced for every token.
MODE_TABLE = {
    ("router", False): ("fixed", "soft", "token"),
    ("oracle", False): ("fixed", "fixed", "fixed"),
    ("forced", False): ("fixed", "fixed", "fixed"),
    ("base", False): ("base", "base", "base"),
    ("label", True): ("fixed", "fixed", "fixed"),
    ("router", True): ("self", "self", "token"),
    ("soft", True): ("soft", "soft", "soft"),
}


def model_mode(moa, routing: str, *, training: bool = False) -> str:
    """(MoAConfig or None, a routing of ROUTINGS, or of TRAIN_ROUTINGS with training=True) -> the model's mode
    (MODES). A model without experts (moa None) always runs 'base'."""
    vocabulary = TRAIN_ROUTINGS if training else ROUTINGS
    if routing not in vocabulary:
        raise ValueError(f"routing={routing!r} is not one of {vocabulary}")
    if moa is None:
        return "base"
    return MODE_TABLE[routing, training][DISPATCH_MODES.index(moa.dispatch)]


def stage_routing(stage: str, train_routing: str) -> str:
    """The training routing (TRAIN_ROUTINGS) a stage (config.STAGES) runs with: stage 2 its `train_routing`; the
    token-level MoE-LoRA baseline routes itself; stage 1 and the mixed LoRA follow the domain label."""
    return {"stage2": train_routing, "moe_lora": "router"}.get(stage, "label")


def routes_per_item(moa, routing: str) -> bool:
    """True when every sequence runs with one expert (or the base) for its whole length; False for soft and
    token-level dispatch, which mix experts inside every forward."""
    return model_mode(moa, routing) in ("base", "fixed")


def routing_pass_mode(moa) -> str:
    """The model's mode for the routing pass over a prompt (MoAConfig.route_on -> 'self' | 'probe')."""
    return "probe" if moa.route_on == "base" else "self"
