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
`resolve` (inference) and `resolve_training` (a training stage) are the one interpreter of these names: they turn
(MoAConfig, what the caller asked) into a `RoutePlan` (the model's mode, where each sequence's expert comes from, and
which routing pass decides), and every caller acts on the plan's fields, never on the names; `MODE_TABLE` spells
out the mode per dispatch. The routing pass that decides a top-1 expert from the prompt is 'self' (the adapted
model, MoAConfig.route_on='adapted', the paper's) or 'probe' (the plain base model, route_on='probe', servable).
Inside a layer each mode is read through its ModeSpec (MODE_SPECS) and becomes a moa_jax/nn/lora.Route (how the
LoRA delta is computed): base, probe -> Route.off(); fixed, self -> Route.top1 (one expert per sequence); soft,
token -> Route.mixture (gated experts).

MoAConfig.dispatch (DISPATCH_MODES) says how the routers pick when they decide: top1 (one expert per sequence,
chosen once from the prompt and then forced with 'fixed'), soft (per-sequence mixture), token_topk (MoE-LoRA).
MoAConfig.decision (DECISION_POLICIES) says which routers decide a top-1 expert at inference: the last layer's
or a vote over layers; MoAConfig.exit_layer, temperature, abstain_below and fallback refine that decision
(early exit, calibration, abstention: `RoutingPolicy`).

This module imports nothing from moa_jax (and no jax), so every layer can use it.

Shape glossary: B batch (sequences), T tokens, E experts.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

DISPATCH_MODES = ("top1", "soft", "token_topk")
DECISION_POLICIES = ("last", "vote")
# Where the routers read at inference (MoAConfig.route_on): "adapted" = the routing pass of the adapted model (each
# layer routed by its own router), "probe" = the probe pass, one plain forward of the base model, no adapters
# (servable: a server routes with its base model, then names the PEFT adapter; moa_jax/reference_router.py).
ROUTE_ON = ("adapted", "probe")
LEGACY_ROUTE_ON = {"base": "probe"}   # route_on's old name for the probe pass, in configs saved before the rename
ROUTINGS = ("router", "oracle", "forced", "base")
AUTO = -1                # MoAConfig.exit_layer / temperature / abstain_below: picked on validation after stage 2
FALLBACK_BASE = "base"   # MoAConfig.fallback: abstained prompts run the base model (adapters off)
TRAIN_ROUTINGS = ("label", "router", "soft")


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    """What one model mode does inside every layer (moa_jax/nn/model.py reads these flags, never the mode's name).
    With adapters on, exactly one of the four pick flags is set."""
    reads_routers: bool            # the layer's router runs on the pooled prompt (its logits are returned)
    adapters: bool                 # the LoRA deltas are applied
    given_expert: bool = False     # top-1 with the caller's expert_idx [B]
    own_argmax: bool = False       # top-1 with each layer's own router argmax
    sequence_gates: bool = False   # per-sequence mixture, softmax(router logits)
    token_gates: bool = False      # token-level top-k mixture with a balance loss

    @property
    def one_expert_per_row(self) -> bool:
        """No per-row decision of the layers' own (packed rows may run it: a row's segments share the row's route)."""
        return not (self.own_argmax or self.sequence_gates)


MODE_SPECS = {
    "base": ModeSpec(reads_routers=False, adapters=False),
    "fixed": ModeSpec(reads_routers=True, adapters=True, given_expert=True),
    "self": ModeSpec(reads_routers=True, adapters=True, own_argmax=True),
    "probe": ModeSpec(reads_routers=True, adapters=False),
    "soft": ModeSpec(reads_routers=True, adapters=True, sequence_gates=True),
    "token": ModeSpec(reads_routers=True, adapters=True, token_gates=True),
}
MODES = tuple(MODE_SPECS)


def mode_spec(mode: str) -> ModeSpec:
    """A model mode (MODES) -> its ModeSpec; a ValueError names the valid modes."""
    if mode not in MODE_SPECS:
        raise ValueError(f"routing={mode!r} is not one of {MODES}")
    return MODE_SPECS[mode]


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


# Where each sequence's expert comes from under a plan (RoutePlan.source).
EXPERT_SOURCES = ("none", "labels", "expert", "routing_pass")


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    """One resolved routing request: what the model runs and what the caller must supply. Hashable (a static jit
    argument and an lru_cache key).

    mode        the model's static mode (MODES)
    source      where the expert of each sequence comes from (EXPERT_SOURCES): none (adapters off, or routing
                inside every forward), labels (the domain ids), expert (one given expert), routing_pass (a pass over
                the prompt decides, then that expert is forced)
    pass_mode   the mode of the routing pass that reads the routers: 'self' (adapted) or 'probe' (plain base model)
    probe_loss  training only: the routers' CE reads a probe pass (stage 2 with route_on='probe')
    """
    mode: str
    source: str = "none"
    pass_mode: str = "self"
    probe_loss: bool = False

    @property
    def adapters_off(self) -> bool:
        return self.mode == "base"

    @property
    def needs_experts(self) -> bool:
        """The model takes expert_idx [B] (one expert per sequence, forced at every layer)."""
        return self.mode == "fixed"

    @property
    def per_item(self) -> bool:
        """Every sequence runs with one expert (or the base) for its whole length; False for soft and token-level
        dispatch, which mix experts inside every forward."""
        return self.mode in ("base", "fixed")

    @property
    def token_level(self) -> bool:
        """Every token is routed on its own (token-level top-k MoE-LoRA), inside every forward."""
        return self.mode == "token"

    @property
    def needs_routing_pass(self) -> bool:
        return self.source == "routing_pass"

    @property
    def needs_given_expert(self) -> bool:
        """The caller must name the experts (an expert id, or one label per sequence)."""
        return self.source in ("labels", "expert")

    @property
    def packable(self) -> bool:
        """A packed row (consecutive examples of one domain) can train with it: the label's expert, or token-level
        routing; not a routing decision of its own per row."""
        return self.source == "labels" or self.mode == "token"

    @property
    def cacheable(self) -> bool:
        """Cached decoding can run it: soft gates are pooled over the whole prompt, a cached step sees one token."""
        return self.mode != "soft"

    def given_experts(self, batch: int, num_experts: int, *, expert=None, labels=None) -> Optional[np.ndarray]:
        """The expert per sequence [B] int32 when the caller names it (source labels / expert), checked; None when
        a routing pass decides or nothing is routed per sequence."""
        if self.source == "expert":
            if expert is None or not 0 <= int(expert) < num_experts:
                raise ValueError(f"routing='forced' needs expert in [0, {num_experts}), got {expert!r}")
            return np.full((batch,), int(expert), np.int32)
        if self.source == "labels":
            if labels is None:
                raise ValueError("routing='oracle' needs domain=[one expert id per sequence]")
            d = np.asarray(labels, np.int32).reshape(-1)
            if d.shape[0] != batch or d.min() < 0 or d.max() >= num_experts:
                raise ValueError(f"domain must hold {batch} ids in [0, {num_experts}), got {d.tolist()}")
            return d
        return None


def routes_on_probe(moa) -> bool:
    """The routers read the probe pass (the plain base model): route_on='probe', the servable policy."""
    return moa is not None and moa.route_on == "probe"


def resolve(moa, routing: str = "router") -> RoutePlan:
    """Inference: (MoAConfig or None, a routing of ROUTINGS) -> the plan. A model without experts runs 'base'."""
    mode = model_mode(moa, routing)
    pass_mode = "probe" if routes_on_probe(moa) else "self"
    if mode == "fixed":
        source = {"router": "routing_pass", "oracle": "labels", "forced": "expert"}[routing]
        return RoutePlan(mode, source, pass_mode)
    return RoutePlan(mode, "none", pass_mode)


def resolve_training(moa, stage: str, train_routing: str) -> RoutePlan:
    """A training stage (config.STAGES) with its TrainConfig.train_routing -> the plan of its forward. Stage 2 with
    route_on='probe' trains the routers on a probe pass (probe_loss) and, routing with the routers, forces the
    probe pass's decision in the LM forward, as inference will."""
    mode = model_mode(moa, stage_routing(stage, train_routing), training=True)
    probe = stage == "stage2" and routes_on_probe(moa)
    if mode == "fixed":
        return RoutePlan(mode, "labels", "probe" if probe else "self", probe)
    if probe and mode == "self":
        return RoutePlan("fixed", "routing_pass", "probe", True)
    return RoutePlan(mode, "none", "probe" if probe else "self", probe)


@dataclasses.dataclass(frozen=True)
class RoutingPolicy:
    """How a top-1 decision is made from the prompt, with every AUTO setting of MoAConfig resolved.

    exit_layer      routers 1..exit_layer decide (the routing pass stops after layer exit_layer); the number of
                    layers L = every router
    decision        'last' | 'vote' over those routers
    temperature     divides the deciding logits before the softmax (calibration)
    abstain_below   a calibrated confidence below it abstains (0 = never)
    fallback        the expert id an abstained prompt runs with, -1 = the base model (adapters off)
    """
    exit_layer: int
    decision: str = "last"
    temperature: float = 1.0
    abstain_below: float = 0.0
    fallback: int = -1

    @property
    def abstains(self) -> bool:
        return self.abstain_below > 0.0


def routing_policy(moa, num_layers: int, expert_names=None) -> RoutingPolicy:
    """MoAConfig + the model's L (+ the expert names, to find a named fall-back) -> its RoutingPolicy. An AUTO
    setting not yet resolved on validation acts as its neutral value (every router, T = 1, never abstain)."""
    k = moa.exit_layer if moa.exit_layer > 0 else num_layers
    if k > num_layers:
        raise ValueError(f"MoAConfig.exit_layer={moa.exit_layer} but the model has {num_layers} layers")
    return RoutingPolicy(k, moa.decision, moa.temperature if moa.temperature > 0 else 1.0,
                         max(moa.abstain_below, 0.0), fallback_index(moa.fallback, expert_names))


def fallback_index(fallback: str, expert_names=None) -> int:
    """MoAConfig.fallback -> -1 (base) or the expert id of that name; an expert id as text is accepted too."""
    if fallback == FALLBACK_BASE:
        return -1
    names = list(expert_names or ())
    if fallback in names:
        return names.index(fallback)
    if fallback.isdigit():
        return int(fallback)
    raise ValueError(f"MoAConfig.fallback={fallback!r} is neither 'base' nor an expert name {names}")
