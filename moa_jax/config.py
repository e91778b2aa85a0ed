"""Frozen configuration dataclasses: the one source of truth for every setting in moa_jax.

One dataclass per concern; each module receives only its own sub-config. Frozen dataclasses are hashable, so
they can be static arguments of `jax.jit`. Presets are functions returning instances; derived values are
properties. Paper defaults that the paper leaves open are marked [ours] (see docs/method.md) and are all options.
ModelConfig lives in moa_jax/model_config.py and DataConfig in moa_jax/data_config.py; both are re-exported here.

Shape glossary used across the package:
  B batch, T tokens, S cache slots, D model width, F MLP width, H query heads, K key/value heads, Dh head width,
  E experts, R LoRA rank, L layers, V vocabulary.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moa_jax.config_fields import absent_values, conditions, renamed_values, roles_of, setting, with_role
from moa_jax.data_config import DATA_MIXING, DATA_SPLITS, LENGTH_POLICIES, PACKING, DataConfig  # noqa: F401
from moa_jax.errors import ConfigError  # noqa: F401  (re-exported)
from moa_jax.errors import require as _check
from moa_jax.model_config import (ATTENTION_PROJECTIONS, DTYPES, HIDDEN_ACTS, LAYER_TYPES,  # noqa: F401
                                  PROJECTIONS, QUANTIZE_MODES, REMAT_POLICIES, ModelConfig, RopeScaling,
                                  check_remat)
from moa_jax.methods import EVAL_METHODS, unknown_methods
from moa_jax.routing import (AUTO, DECISION_POLICIES, DISPATCH_MODES, FALLBACK_BASE, LEGACY_ROUTE_ON, ROUTE_ON,
                             TRAIN_ROUTINGS, resolve, resolve_training, routes_on_probe)
from moa_jax.variants import Variant, parse_variant

_PROJECTION_ALIASES = {p.removesuffix("_proj"): p for p in PROJECTIONS}
ROUTER_TYPES = ("linear", "mlp")
EXPERTS_FROM_DATA = 0   # MoAConfig.num_experts left unset: one expert per domain of the run's data


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
    # E; E=1 is a plain LoRA. 0 (EXPERTS_FROM_DATA): the data's domain count, resolved by `for_domains` before a run
    # builds anything, so checkpoints and adapters record the number
    num_experts: int = setting(EXPERTS_FROM_DATA, "function", "locked")
    rank: int = setting(16, "function", "locked")          # R
    alpha: float = setting(32.0, "function", "locked")
    dropout: float = 0.05
    targets: tuple = setting(PROJECTIONS, "function", "locked")  # [ours] all seven projections
    use_rslora: bool = setting(False, "function", "locked")    # scale alpha/sqrt(R) instead of alpha/R
    dispatch: str = setting("top1", "function")  # top1 per sequence | soft per sequence | token_topk (MoE-LoRA)
    top_k: int = setting(2, "function", "variant", only_if=("dispatch", "token_topk"))   # token_topk only
    router_type: str = setting("linear", "function", "locked")   # [ours] bias-free linear; 'mlp' = two-layer MLP
    router_hidden: int = setting(256, "function", "locked", only_if=("router_type", "mlp"))   # mlp router only
    decision: str = setting("last", "inert", "variant")   # inference policy: last router (paper) | vote over layers
    # ROUTE_ON: the routers read the adapted routing pass (paper) | the probe pass, the plain base model's hidden
    # states (servable; stage 2 trains the routers on those)
    route_on: str = setting("adapted", "variant", "stage2", absent="adapted", renamed=LEGACY_ROUTE_ON)
    # The routing decision at inference (moa_jax/eval/calibration.py fits the AUTO ones on validation after stage 2;
    # the run's routing.json records what it picked and load_run applies it):
    # exit_layer: 0 = every router decides; k = the routing pass stops at layer k and routers 1..k decide (early exit);
    # AUTO (-1) = the shallowest k whose validation routing accuracy is within exit_tolerance points of the best
    exit_layer: int = setting(0, "inert", "variant")
    exit_tolerance: float = setting(0.5, "inert", "variant")
    # temperature dividing the deciding logits (calibration); AUTO (-1) = fitted on validation (minimum NLL)
    temperature: float = setting(1.0, "inert", "variant")
    # abstain when the calibrated confidence is below this (0 = never); AUTO (-1) = the largest threshold that keeps
    # abstain_coverage of the in-domain validation prompts routed
    abstain_below: float = setting(0.0, "inert", "variant")
    abstain_coverage: float = setting(0.98, "inert", "variant")
    fallback: str = setting(FALLBACK_BASE, "inert", "variant")   # where abstained prompts go: base | an expert's name
    adapter_dtype: str = setting("float32", "locked")  # storage dtype of experts and routers (master weights)

    def __post_init__(self):
        object.__setattr__(self, "targets", normalize_targets(self.targets))
        _check(self.num_experts >= 0, f"MoAConfig.num_experts must be >= 1 (or 0: one per domain of the data), got "
               f"{self.num_experts}")
        _check(self.rank >= 1, f"MoAConfig.rank must be >= 1, got {self.rank}")
        _check(0.0 <= self.dropout < 1.0, f"MoAConfig.dropout must be in [0, 1), got {self.dropout}")
        _check(self.dispatch in DISPATCH_MODES, f"MoAConfig.dispatch={self.dispatch!r} not in {DISPATCH_MODES}")
        _check(self.router_type in ROUTER_TYPES, f"MoAConfig.router_type={self.router_type!r} not in {ROUTER_TYPES}")
        _check(self.decision in DECISION_POLICIES,
               f"MoAConfig.decision={self.decision!r} not in {DECISION_POLICIES}")
        if self.route_on in LEGACY_ROUTE_ON:   # configs saved before route_on's values were renamed
            object.__setattr__(self, "route_on", LEGACY_ROUTE_ON[self.route_on])
        _check(self.route_on in ROUTE_ON, f"MoAConfig.route_on={self.route_on!r} not in {ROUTE_ON}: 'adapted' routes "
               f"with the adapted model's routing pass, 'probe' with one forward of the plain base model (servable)")
        _check(not routes_on_probe(self) or resolve(self).needs_routing_pass,
               f"MoAConfig.route_on='probe' needs dispatch='top1' (got {self.dispatch!r}): soft and token-level "
               f"dispatch route inside every forward of the adapted model")
        _check(self.top_k >= 1, f"MoAConfig.top_k must be >= 1, got {self.top_k}")
        # top_k is used only by token_topk; checking it otherwise would reject E=1 (a plain LoRA) at top_k=2. An
        # unset E is checked when the data resolves it (for_domains re-runs this).
        _check(not resolve(self).token_level or self.num_experts == EXPERTS_FROM_DATA
               or self.top_k <= self.num_experts,
               f"MoAConfig.top_k={self.top_k} must be <= num_experts={self.num_experts} for dispatch='token_topk'")
        _check(self.exit_layer >= AUTO, f"MoAConfig.exit_layer={self.exit_layer}: 0 (every router), k >= 1 (stop "
               f"after layer k) or {AUTO} (picked on validation)")
        _check(self.exit_tolerance >= 0, f"MoAConfig.exit_tolerance={self.exit_tolerance} must be >= 0 (points)")
        _check(self.temperature > 0 or self.temperature == AUTO, f"MoAConfig.temperature={self.temperature}: "
               f"a temperature > 0, or {AUTO} (fitted on validation)")
        _check(0.0 <= self.abstain_below <= 1.0 or self.abstain_below == AUTO, f"MoAConfig.abstain_below="
               f"{self.abstain_below}: a probability in [0, 1] (0 = never abstain), or {AUTO} (picked on validation)")
        _check(0.0 < self.abstain_coverage <= 1.0, f"MoAConfig.abstain_coverage={self.abstain_coverage} must be in "
               f"(0, 1]")
        _check(bool(self.fallback), "MoAConfig.fallback is empty: 'base' (adapters off) or an expert's domain name")
        _check(self.abstain_below == 0.0 or resolve(self).needs_routing_pass, f"MoAConfig.abstain_below needs "
               f"dispatch='top1' (got {self.dispatch!r}): only a top-1 decision from the prompt can abstain")
        _check(self.adapter_dtype in DTYPES, f"MoAConfig.adapter_dtype={self.adapter_dtype!r} not in {DTYPES}")

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.use_rslora else self.rank)

    def for_domains(self, domains) -> "MoAConfig":
        """This config on data with these domains, one expert each: num_experts = len(domains) when left unset (0);
        a set value that differs is a ConfigError."""
        n = len(domains)
        if self.num_experts == EXPERTS_FROM_DATA:
            return dataclasses.replace(self, num_experts=n)
        _check(self.num_experts == n, f"moa.num_experts={self.num_experts} but the data has {n} domains "
               f"{list(domains)}: MoA trains one expert per domain; leave moa.num_experts unset (it follows the "
               f"data) or --set moa.num_experts={n}")
        return self

    def check_experts_known(self) -> None:
        """Building a model needs the expert count; only a run's data can stand in for it (`for_domains`)."""
        _check(self.num_experts != EXPERTS_FROM_DATA, "MoAConfig.num_experts is unset (0 = one expert per domain of "
               "a run's data) and there is no data here to take it from: set num_experts, e.g. "
               "MoAConfig(num_experts=4, ...)")


# The MoAConfig fields only the routing pass's decision reads (the adapters' forward does not depend on them).
ROUTING_DECISION_FIELDS = ("decision", "route_on", "exit_layer", "exit_tolerance", "temperature", "abstain_below",
                           "abstain_coverage", "fallback")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: ('data', 'expert') axes; -1 means 'all remaining devices'."""
    data: int = -1
    expert: int = 1
    fsdp: bool = False  # split the frozen base weights over 'data' (large models)


STAGES = ("stage1", "stage2", "mixed_lora", "moe_lora")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (one stage). Stage semantics (paper Sec. 3; our choices are listed in docs/method.md):
    stage1     all experts at once with label routing; each sample updates only its own expert; routers frozen.
    stage2     experts (from stage 1) + routers jointly; loss = LM + eta * mean-over-layers router CE.
    mixed_lora the Single-LoRA (mixed) baseline: one LoRA (E=1) on all domains mixed.
    moe_lora   the MoE-LoRA baseline: token-level top-k routing, no labels, + balance_coef * balance loss.
    """
    stage: str = "stage2"
    steps: int = 100
    learning_rate: float = 5e-4
    warmup_frac: float = 0.1        # paper: 10% warmup, then cosine decay
    end_lr_frac: float = 0.0
    weight_decay: float = 0.0
    adam_b2: float = setting(0.999, absent=0.999)   # AdamW second-moment decay (optax's default; 0.95 in the
                                                    # accelerator presets)
    grad_clip: float = 1.0          # global norm; in stage 1 applied per expert (independent trainings)
    grad_accum: int = 1             # micro-batches per optimiser update
    eta: float = 1.0                # [ours] router CE weight (stage 2)
    router_lr_mult: float = 1.0     # routers start from random init while experts start trained: they may get
                                    # learning_rate * router_lr_mult (moa_10task uses 10: at 1x, 40 CPU steps left
                                    # them near chance)
    balance_coef: float = 0.01      # moe_lora load-balancing weight
    freeze_experts: bool = False    # stage 2 ablation: train routers only
    expert_init: str = "stage1"     # stage 2: "stage1" experts | "random" (ablation)
    train_routing: str = "label"    # stage 2 forward: label (teacher forcing) | router argmax | soft mixture
    loss_normalization: str = ""    # "token" (mean over all tokens) | "domain" (sum of per-domain means);
                                    # "" = "domain" for stage1 (N independent trainings), else "token"
    router_prior: tuple = setting((), absent=[])   # share of each domain in the batches (add_domain's re-fit sets
                                    # it): the router CE adds log(share) to the logits, so routers learn prompts,
                                    # not frequencies
    init_from_peft: tuple = ()     # stage 1 only: PEFT LoRA adapter dirs ("DIR" or "domain=DIR") used as the
                                    # stage-1 experts instead of training them (matched to the domains by name)
    router_fit_prompts: int = setting(0, absent=0)   # stage 2 only, with moa.route_on=probe: after the SGD steps,
                                    # every router output is fitted to convergence on the cached base-model inputs of
                                    # the first N train prompts of each domain (moa_jax/train/router_fit.py); 0 = off.
                                    # SGD gives each domain about steps * batch_size / E rows: with many domains the
                                    # routers stay unconverged (moa_52task: 0.78 routing at SGD alone)
    seed: int = 0
    log_every: int = setting(10, "inert")
    checkpoint_every: int = setting(50, "inert")
    keep_checkpoints: int = setting(2, "inert")
    eval_every: int = setting(0, "inert")     # validation loss every N steps and at the last step (0 = off); the
                                              # lowest is kept as <stage>/best_adapters (moa_jax/train/validation.py)
    eval_batches: int = setting(4, "inert")   # validation batches of data.batch_size rows, the same ones each time

    def __post_init__(self):
        _check(self.stage in STAGES, f"TrainConfig.stage={self.stage!r} not in {STAGES}")
        _check(self.train_routing in TRAIN_ROUTINGS,
               f"TrainConfig.train_routing={self.train_routing!r} not in {TRAIN_ROUTINGS}")
        _check(self.expert_init in ("stage1", "random"),
               f"TrainConfig.expert_init={self.expert_init!r} not in ('stage1', 'random')")
        _check(self.loss_normalization in ("", "token", "domain"),
               f"TrainConfig.loss_normalization={self.loss_normalization!r} not in ('token', 'domain')")
        object.__setattr__(self, "init_from_peft", tuple(self.init_from_peft))
        object.__setattr__(self, "router_prior", tuple(float(p) for p in self.router_prior))
        _check(all(p > 0 for p in self.router_prior), f"TrainConfig.router_prior must be > 0, got {self.router_prior}")
        _check(not self.init_from_peft or self.stage == "stage1",
               f"TrainConfig.init_from_peft is a stage-1 option (stage {self.stage!r}): set stage1.init_from_peft")
        _check(self.router_fit_prompts >= 0,
               f"TrainConfig.router_fit_prompts must be >= 0, got {self.router_fit_prompts}")
        _check(not self.router_fit_prompts or self.stage == "stage2",
               f"TrainConfig.router_fit_prompts is a stage-2 option (stage {self.stage!r}): set "
               f"stage2.router_fit_prompts")
        _check(self.steps >= 0, f"TrainConfig.steps must be >= 0, got {self.steps}")
        _check(self.grad_accum >= 1, f"TrainConfig.grad_accum must be >= 1, got {self.grad_accum}")
        _check(0.0 < self.adam_b2 < 1.0, f"TrainConfig.adam_b2 must be in (0, 1), got {self.adam_b2}")
        _check(self.learning_rate > 0, f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        _check(self.router_lr_mult > 0, f"TrainConfig.router_lr_mult must be > 0, got {self.router_lr_mult}")
        _check(self.eval_every >= 0, f"TrainConfig.eval_every must be >= 0 (0 = no validation), got {self.eval_every}")
        _check(self.eval_batches >= 1, f"TrainConfig.eval_batches must be >= 1, got {self.eval_batches}")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints"):   # step counts: 0 would divide by zero
            key = "baseline" if self.stage == "mixed_lora" else self.stage   # its ExperimentConfig field
            _check(getattr(self, name) >= 1, f"TrainConfig.{name} must be >= 1, got "
                   f"{getattr(self, name)}; e.g. --set {key}.{name}=10")

    @property
    def normalization(self) -> str:
        return self.loss_normalization or ("domain" if self.stage == "stage1" else "token")


def replace(cfg, **changes):
    """dataclasses.replace that re-runs validation (frozen dataclasses)."""
    return dataclasses.replace(cfg, **changes)


# ---- evaluation and experiments (the methods: moa_jax/methods.py) ----


EVAL_ADAPTERS = ("final", "best")


@dataclass(frozen=True)
class EvalConfig:
    """Test-split evaluation: perplexity, greedy-generation metrics (verifier accuracy, BLEU-4, ROUGE-L) and
    routing, per domain. `methods`: names of moa_jax/methods.py METHODS (most_common = the most common TRAIN answer of
    the domain, a floor; base; single_lora = stage-1 experts, domain given; mixed_lora; moa_router; moa_oracle;
    moe_lora)."""
    items_per_domain: int = 200     # test items per domain (>= 200 for claims; at 50, < ~0.1 apart is noise)
    ppl_items_per_domain: int = 0   # PPL (teacher-forced, cheap) over this many test items per domain instead of
                                    # the generation items; 0 = the items_per_domain generation items
    max_new_tokens: int = 32
    batch_size: int = 32
    methods: tuple = ("most_common", "base", "single_lora", "mixed_lora", "moa_router", "moa_oracle")
    adapters: str = "final"         # which adapters of each stage are evaluated: the final ones | "best": the
                                    # lowest validation loss (<stage>/best_adapters; needs the stages' eval_every)
    routing_study: bool = False     # the routing study after stage 2 (early exit per layer, calibration,
                                    # abstention; moa_jax/eval/calibration.py); it also runs when a moa.exit_layer,
                                    # temperature or abstain_below setting is AUTO (picked by it)

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        _check(self.adapters in EVAL_ADAPTERS, f"EvalConfig.adapters={self.adapters!r} not in {EVAL_ADAPTERS}")
        bad = unknown_methods(self.methods)
        _check(not bad, f"EvalConfig.methods: unknown {bad}; valid: {EVAL_METHODS}")
        _check(self.items_per_domain >= 1, f"EvalConfig.items_per_domain must be >= 1, got {self.items_per_domain}")
        _check(self.max_new_tokens >= 1, f"EvalConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.ppl_items_per_domain >= 0,
               f"EvalConfig.ppl_items_per_domain must be >= 0 (0 = the generation items), got "
               f"{self.ppl_items_per_domain}")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole MoA experiment: stage 1 -> stage 2 -> baselines -> evaluation (see experiments/registry.py). The
    workflows that need more (add_domain, the capacity study) carry their own section (moa_jax/workflows/sections.py).

    model: the embedded name, an HF checkpoint directory, a .gguf file, or "tiny-random" (a random tiny Llama with
    the embedded tokenizer, for smoke tests). dtype "auto": float32 on CPU, bfloat16 on accelerators.
    baseline.steps 0 = stage1.steps + stage2.steps (the same examples as MoA sees in both stages).
    variants: ablation specs (see `Variant`); each trains in `<workdir>/variants/<NAME>/` from the shared stage 1.
    reuse_from: the work directory of an earlier run whose adapters are loaded instead of training a stage when
    that stage's resolved config is the same (stage 1 must match, or the run stops naming the differing fields).
    quantize: "int8" stores the frozen projection kernels as int8 with per-channel scales (moa_jax/nn/quantize.py).
    """
    name: str = setting("custom", "inert")
    model: str = setting("smollm2-135m-instruct", "function", "locked")
    dtype: str = "auto"
    moa: MoAConfig = MoAConfig()
    data: DataConfig = DataConfig()
    stage1: TrainConfig = TrainConfig(stage="stage1")
    stage2: TrainConfig = setting(TrainConfig(stage="stage2"), "variant")
    baseline: TrainConfig = TrainConfig(stage="mixed_lora", steps=0)
    moe_lora: TrainConfig = setting(TrainConfig(stage="moe_lora", steps=0), "variant")
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()
    variants: tuple = ()
    reuse_from: str = ""
    remat: str = "auto"           # ModelConfig.remat of the loaded model (REMAT_POLICIES)
    loss_chunk: int = 1024        # ModelConfig.loss_chunk of the loaded model
    quantize: str = setting("none", "locked")
    wandb: str = setting("", "inert")   # a Weights & Biases project: training rows are logged there too (needs the
                                        # wandb package; WANDB_MODE=offline keeps them local); "" = off

    def __post_init__(self):
        object.__setattr__(self, "variants", tuple(self.variants))
        _check(self.quantize in QUANTIZE_MODES, f"ExperimentConfig.quantize={self.quantize!r} not in {QUANTIZE_MODES}")
        parsed = [parse_variant(v) for v in self.variants]
        names = [v.name for v in parsed]
        _check(len(set(names)) == len(names), f"ExperimentConfig.variants: duplicate names in {names}")
        may_vary = experiment_keys("variant")
        for v in parsed:
            for key in (s.split("=", 1)[0] for s in v.sets):
                _check(any(key == k or key.startswith(k + ".") for k in may_vary),
                       f"variant {v.name!r}: key {key!r} cannot vary; a variant shares stage 1 and the data, so it may "
                       f"only set {', '.join(k + ('.*' if '.' not in k else '') for k in may_vary)}")
        _check(self.dtype in ("auto",) + DTYPES, f"ExperimentConfig.dtype={self.dtype!r} not in {('auto',) + DTYPES}")
        check_remat(self.remat, "ExperimentConfig")
        _check(self.loss_chunk >= 1, f"ExperimentConfig.loss_chunk must be >= 1, got {self.loss_chunk}")
        _check(self.stage1.stage == "stage1", "ExperimentConfig.stage1.stage must be 'stage1'")
        _check(self.stage2.stage == "stage2", "ExperimentConfig.stage2.stage must be 'stage2'")
        _check(not self.stage2.router_fit_prompts or self.moa.route_on == "probe",
               f"ExperimentConfig: stage2.router_fit_prompts={self.stage2.router_fit_prompts} fits routers that read "
               f"the plain base model, but moa.route_on={self.moa.route_on!r}; set moa.route_on=probe or "
               f"stage2.router_fit_prompts=0")
        _check(self.baseline.stage == "mixed_lora", "ExperimentConfig.baseline.stage must be 'mixed_lora'")
        _check(self.moe_lora.stage == "moe_lora", "ExperimentConfig.moe_lora.stage must be 'moe_lora'")
        if self.eval.adapters == "best":   # every evaluated stage needs its validation record
            trains = {"stage1": not self.stage1.init_from_peft, "stage2": True,
                      "baseline": "mixed_lora" in self.eval.methods, "moe_lora": "moe_lora" in self.eval.methods}
            off = [k for k, used in trains.items() if used and getattr(self, k).eval_every == 0]
            if off:
                raise ConfigError(f"ExperimentConfig: eval.adapters='best' evaluates each stage's lowest-validation-"
                                  f"loss adapters, but {', '.join(k + '.eval_every' for k in off)} is 0 (no "
                                  f"validation): set it, e.g. --set {off[0]}.eval_every=10")
        _check(resolve(self.moa).cacheable or "moa_router" not in self.eval.methods,
               "ExperimentConfig: moa.dispatch='soft' with eval.methods containing 'moa_router': the evaluation "
               "generates answers, and cached decoding cannot re-pool soft gates over new tokens; use "
               "moa.dispatch=top1 (MoA as in the paper) or drop moa_router from eval.methods")
        _check(self.data.packing == "none" or resolve_training(self.moa, "stage2", self.stage2.train_routing).packable,
            f"ExperimentConfig: data.packing={self.data.packing!r} with stage2.train_routing="
            f"{self.stage2.train_routing!r}: a packed row runs one expert (label routing) or token-level routing, "
            "not a decision of its own per segment; use stage2.train_routing=label or data.packing=none")
        _check(not routes_on_probe(self.moa)
               or resolve_training(self.moa, "stage2", self.stage2.train_routing).per_item,
               "ExperimentConfig: moa.route_on='probe' with stage2.train_routing='soft': a soft mixture has no single "
               "expert to take from the base model's routers; use stage2.train_routing=label (default) or router")


# ---- which saved keys matter, derived from the field roles (moa_jax/config_fields.py) ----

# A stage's saved config (workflows/context.py ExperimentContext.config_dict): these sections, plus two fields of
# ExperimentConfig under other names.
STAGE_SECTIONS = {"model": ModelConfig, "moa": MoAConfig, "train": TrainConfig, "data": DataConfig}
_SAVED_AS = {"model": "model.source", "name": "experiment"}


def stage_keys(role: str) -> tuple[str, ...]:
    """Dotted keys of a saved stage config ("moa.rank") whose field carries `role`."""
    top = tuple(_SAVED_AS[f.name] for f in dataclasses.fields(ExperimentConfig)
                if f.name in _SAVED_AS and role in roles_of(f))
    return top + tuple(f"{section}.{name}" for section, cls in STAGE_SECTIONS.items() for name in with_role(cls, role))


def stage_absent_values() -> dict:
    """Dotted stage-config key -> the value a config saved before that field existed ran with."""
    return {f"{section}.{name}": value for section, cls in STAGE_SECTIONS.items()
            for name, value in absent_values(cls).items()}


def stage_renamed_values() -> dict:
    """Dotted stage-config key -> {old value: current value}."""
    return {f"{section}.{name}": renamed for section, cls in STAGE_SECTIONS.items()
            for name, renamed in renamed_values(cls).items()}


def stage_conditions() -> dict:
    """Dotted stage-config key -> (dotted key, value) under which it counts ("moa.top_k" only with token_topk)."""
    return {f"{section}.{name}": (f"{section}.{other}", value) for section, cls in STAGE_SECTIONS.items()
            for name, (other, value) in conditions(cls).items()}


def experiment_keys(role: str) -> tuple[str, ...]:
    """Dotted keys of an ExperimentConfig ("moa.rank", "model") whose field carries `role`; a section field with the
    role (stage2) stands for all of its keys."""
    out = []
    for f in dataclasses.fields(ExperimentConfig):
        if role in roles_of(f):
            out.append(f.name)
        elif dataclasses.is_dataclass(f.default):   # a section: moa, data, stage1, ...
            out += [f"{f.name}.{name}" for name in with_role(type(f.default), role)]
    return tuple(out)
