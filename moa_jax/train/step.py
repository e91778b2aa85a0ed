"""The pure training step: TrainState, the MoA loss, the optimiser, and `train_step(state, frozen, batch)`.

Loss = masked LM cross-entropy on response tokens + eta * mean over layers of the router CE against the domain
label (stage 2) [+ balance_coef * load-balancing loss for the token-level MoE-LoRA baseline]. With
MoAConfig.route_on='probe' the router CE is taken on a second, adapter-free forward of the base model (the servable
routing pass, `base_router_logits`); the LM forward is unchanged (label routing, or that pass's decision).
Only the trainable tree (experts + routers) gets gradients and optimiser state. Stage 1 is N independent
single-domain trainings done at once: the LM loss is the sum over domains of each domain's mean token loss, and
gradients are clipped per expert, so expert e's update depends on its own domain's samples only.

Batches carry a leading micro-batch axis A (gradient accumulation, a lax.scan):
  tokens, loss_mask, prompt_mask, attention_mask [A, B, T] int32;  domain [A, B] int32;  valid [A, B] (0 = pad row);
  optional compact targets target_pos, target_tokens, target_weight [A, B, K] (see moa_jax/data/targets.py);
  packed rows (moa_jax/data/packing.py) also segment_ids [A, B, T] and segment_valid [A, B, G]: the router CE is
  then taken per segment (each segment's prompt pooled on its own, labelled with its row's domain).
loss_mask[t] = 1 when token t is a target: logits[:, t-1] predict tokens[:, t].

Shape glossary: A micro-batches, B batch, T tokens, G segments of a packed row, V vocab, L layers, E experts,
N domains.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from moa_jax.config import TrainConfig
from moa_jax.nn.lm_loss import token_nll
from moa_jax.nn.entry import ModelInputs, lm_nll, routing_pass
from moa_jax.nn.model import MoATransformer
from moa_jax.params import merge_params
from moa_jax.nn.router import decide, router_accuracy, router_ce_loss
from moa_jax.routing import resolve_training

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Params
    opt_state: optax.OptState
    rng: jax.Array
    nonfinite: jax.Array  # number of updates skipped: loss, gradients or updated params not finite


def _param_group(path: tuple[str, ...], tcfg: TrainConfig) -> str:
    is_router = "router" in path
    if tcfg.stage in ("stage1", "mixed_lora"):
        return "frozen" if is_router else "expert"
    if tcfg.stage == "stage2" and tcfg.freeze_experts and not is_router:
        return "frozen"
    return "router" if is_router else "expert"


def clip_per_expert(max_norm: float) -> optax.GradientTransformation:
    """Clip each expert's gradient (its slice along E of every [L, E, ...] stack) to max_norm separately;
    other leaves (routers) are clipped together. Keeps stage-1 experts independent."""
    def update(updates, state, params=None):
        flat = traverse_util.flatten_dict(updates)
        expert_sq = sum(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=(0, 2, 3))
                        for k, v in flat.items() if k[-1] in ("lora_a", "lora_b"))            # (E,)
        other_sq = sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for k, v in flat.items()
                       if k[-1] not in ("lora_a", "lora_b"))
        scale_e = jnp.minimum(1.0, max_norm / (jnp.sqrt(expert_sq) + 1e-12))
        scale_o = jnp.minimum(1.0, max_norm / (jnp.sqrt(other_sq) + 1e-12))
        out = {k: (v * scale_e[None, :, None, None].astype(v.dtype) if k[-1] in ("lora_a", "lora_b")
                   else v * scale_o.astype(v.dtype)) for k, v in flat.items()}
        return traverse_util.unflatten_dict(out), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def learning_rate_schedule(tcfg: TrainConfig, mult: float = 1.0) -> optax.Schedule:
    warmup = max(1, int(tcfg.warmup_frac * tcfg.steps))
    peak = tcfg.learning_rate * mult
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(tcfg.steps, warmup + 1),
                                              peak * tcfg.end_lr_frac)


def logged_learning_rates(tcfg: TrainConfig, step: int) -> dict[str, float]:
    """The schedule's learning rate of the update that completed step `step` (1-based; optax counts from 0) per
    trained group, as make_optimizer builds it: `learning_rate` (experts) and, in stages that train routers,
    `learning_rate_router` (x router_lr_mult). Host-side, for the logs only."""
    count = max(step - 1, 0)
    groups = {_param_group(("lora_a",), tcfg): 1.0, _param_group(("router",), tcfg): tcfg.router_lr_mult}
    names = {"expert": "learning_rate", "router": "learning_rate_router"}
    return {names[g]: float(learning_rate_schedule(tcfg, mult)(count)) for g, mult in groups.items() if g in names}


def make_optimizer(tcfg: TrainConfig, trainable: Params) -> optax.GradientTransformation:
    """AdamW + warmup-cosine, clipping, and zero updates (no state) for the groups frozen in this stage."""
    clip = clip_per_expert(tcfg.grad_clip) if tcfg.stage == "stage1" else optax.clip_by_global_norm(tcfg.grad_clip)
    labels = traverse_util.unflatten_dict(
        {k: _param_group(k, tcfg) for k in traverse_util.flatten_dict(trainable)})
    groups = set(traverse_util.flatten_dict(labels).values())
    transforms = {g: optax.set_to_zero() if g == "frozen" else
                  optax.adamw(learning_rate_schedule(tcfg, tcfg.router_lr_mult if g == "router" else 1.0),
                              b2=tcfg.adam_b2, weight_decay=tcfg.weight_decay) for g in groups}
    return optax.chain(clip, optax.multi_transform(transforms, labels))


def lm_loss_terms(logits, targets, weights, domain, num_domains: int):
    """logits [B, K, V] predicting targets [B, K] with weights [B, K] -> (nll [B, K], weights f32 [B, K],
    per-domain nll sums [N], per-domain token counts [N])."""
    return nll_loss_terms(token_nll(logits, targets), weights, domain, num_domains)


def nll_loss_terms(nll, weights, domain, num_domains: int):
    """nll [B, K] with weights [B, K] -> (nll, weights f32 [B, K], per-domain nll sums [N], token counts [N])."""
    w = weights.astype(jnp.float32)
    onehot = jax.nn.one_hot(domain, num_domains, dtype=jnp.float32)                       # (B, N)
    dom_sum = onehot.T @ jnp.sum(nll * w, axis=1)
    dom_cnt = onehot.T @ jnp.sum(w, axis=1)
    return nll, w, dom_sum, dom_cnt


def next_token_targets(tokens, loss_mask):
    """Full-sequence form: logits at t predict tokens[t+1] where loss_mask[t+1] = 1.
    -> (positions [B, T-1], targets [B, T-1], weights [B, T-1])."""
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t - 1), (b, t - 1)), tokens[:, 1:], loss_mask[:, 1:]


def loss_fn(trainable, frozen, batch, rng, *, model: MoATransformer, tcfg: TrainConfig, num_domains: int):
    """One micro-batch [B, T] -> (loss, aux metrics)."""
    params = merge_params(frozen, trainable)
    plan = resolve_training(model.moa, tcfg.stage, tcfg.train_routing)
    valid = batch["valid"].astype(jnp.float32)
    expert_idx = batch["domain"] if plan.needs_given_expert else None
    base_logits = None
    if plan.probe_loss:
        base_logits = base_router_logits(model, params, batch)                            # (L, B, E)
        if plan.needs_routing_pass:   # route the LM forward as inference will: the probe pass's decision
            expert_idx = decide(jax.lax.stop_gradient(base_logits), model.moa.decision)
    if "target_pos" in batch:   # compact: logits only where the next token is a target
        pos, targets, weights = batch["target_pos"], batch["target_tokens"], batch["target_weight"]
    else:
        pos, targets, weights = next_token_targets(batch["tokens"], batch["loss_mask"])
    # Batches are right-padded (moa_jax/data/pipeline.py); the NLL comes chunked, without [B, K, V] logits.
    nll, aux = lm_nll(model, params, ModelInputs.of(batch), pos, targets, mode=plan.mode, expert_idx=expert_idx,
                      rng=rng)
    weights = weights * batch["valid"][:, None]
    nll, w, dom_sum, dom_cnt = nll_loss_terms(nll, weights, batch["domain"], num_domains)
    if tcfg.normalization == "domain":
        lm = jnp.sum(jnp.where(dom_cnt > 0, dom_sum / jnp.maximum(dom_cnt, 1.0), 0.0))
    else:
        lm = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    loss = lm
    labels, label_valid = batch["domain"], valid                                          # (B,) per routed prompt
    if "segment_ids" in batch:  # packed rows: one routed prompt per segment, every segment of a row one domain
        g = batch["segment_valid"].shape[-1]
        labels, label_valid = jnp.repeat(labels, g), (batch["segment_valid"] * valid[:, None]).reshape(-1)
    metrics = {"lm_loss_sum": jnp.sum(nll * w), "tokens": jnp.sum(w), "domain_loss_sum": dom_sum,
               "domain_tokens": dom_cnt, "examples": jnp.sum(label_valid)}
    if tcfg.stage == "stage2":  # routers are label-supervised only in stage 2
        r_logits = aux["router_logits"] if base_logits is None else base_logits
        r_logits = r_logits.reshape(r_logits.shape[0], -1, r_logits.shape[-1])            # (L, B[*G], E)
        prior = jnp.log(jnp.asarray(tcfg.router_prior or (1.0,), jnp.float32))   # logit adjustment (TrainConfig)
        r_loss = router_ce_loss(r_logits + prior, labels, label_valid)
        metrics.update(router_loss=r_loss, router_acc=router_accuracy(r_logits, labels, label_valid))
        if tcfg.eta > 0:
            loss = loss + tcfg.eta * r_loss
    if tcfg.stage == "moe_lora":
        loss = loss + tcfg.balance_coef * aux["balance_loss"]
        metrics["balance_loss"] = aux["balance_loss"]
    return loss, metrics


def base_router_logits(model: MoATransformer, params, batch) -> jax.Array:
    """Router logits [L, B, E] ([L, B, G, E] for packed rows) of the servable routing pass
    (MoAConfig.route_on='probe'): one forward of the frozen base model, no adapters and no dropout, every layer's
    router on the base hidden state entering it, pooled over the prompt. Only the routers get gradients from it
    (nothing else of the trainable tree is used); only one position reaches the LM head."""
    return routing_pass(model, params, ModelInputs.of(batch), mode="probe")


def train_step(state: TrainState, frozen: Params, batch: dict[str, jax.Array], *, model: MoATransformer,
               tcfg: TrainConfig, tx: optax.GradientTransformation, num_domains: int):
    """Pure: (state, frozen, batch [A, B, ...]) -> (state, metrics). Non-finite updates are skipped + counted."""
    rng, step_rng = jax.random.split(state.rng)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    num_micro = batch["tokens"].shape[0]

    def micro(carry, xs):
        grads_acc, loss_acc = carry
        mb, mrng = xs
        (loss, m), g = grad_fn(state.trainable, frozen, mb, mrng, model=model, tcfg=tcfg, num_domains=num_domains)
        return (jax.tree_util.tree_map(jnp.add, grads_acc, g), loss_acc + loss), m

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
    (grads, loss), ms = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)),
                                     (batch, jax.random.split(step_rng, num_micro)))
    grads = jax.tree_util.tree_map(lambda g: g / num_micro, grads)
    loss = loss / num_micro
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    grad_norm = optax.global_norm(grads)
    # A finite loss and gradient can still give non-finite parameters (an overflowing learning rate): check them too.
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(trainable)]))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(step=state.step + 1, trainable=keep(trainable, state.trainable),
                           opt_state=keep(opt_state, state.opt_state), rng=rng,
                           nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
    tokens = jnp.sum(ms["tokens"])
    metrics = {"loss": loss, "lm_loss": jnp.sum(ms["lm_loss_sum"]) / jnp.maximum(tokens, 1.0),
               "grad_norm": grad_norm, "tokens": tokens, "seq_tokens": jnp.sum(batch["attention_mask"]),
               "examples": jnp.sum(ms["examples"]),
               "domain_loss_sum": jnp.sum(ms["domain_loss_sum"], 0),
               "domain_tokens": jnp.sum(ms["domain_tokens"], 0), "finite": finite,
               **{k: jnp.mean(ms[k]) for k in ("router_loss", "router_acc", "balance_loss") if k in ms}}
    return new_state, metrics


def validation_metrics(trainable: Params, frozen: Params, batches: dict[str, jax.Array], *, model: MoATransformer,
                       tcfg: TrainConfig, num_domains: int) -> dict[str, jax.Array]:
    """Pure: the stage's loss on fixed validation batches [NB, B, ...] (the micro-batch layout of `train_step`), with
    the training forward (the same routing plan) but no dropout and no random key, so it never touches the
    training state's RNG. Pooled over all NB batches: `lm_loss` (mean NLL per response token), per-domain sums, and
    `loss`, the stage's objective (with per-domain normalisation the sum of the domains' mean losses; + eta x
    `router_loss` in stage 2, + balance_coef x `balance_loss` for MoE-LoRA); `router_acc` over the routed prompts."""
    def one(carry, mb):
        _, m = loss_fn(trainable, frozen, mb, None, model=model, tcfg=tcfg, num_domains=num_domains)
        return carry, m

    _, ms = jax.lax.scan(one, None, batches)                                                # each leaf (NB, ...)
    tokens = jnp.sum(ms["tokens"])
    dom_sum, dom_cnt = jnp.sum(ms["domain_loss_sum"], 0), jnp.sum(ms["domain_tokens"], 0)   # (N,), (N,)
    lm = jnp.sum(ms["lm_loss_sum"]) / jnp.maximum(tokens, 1.0)
    if tcfg.normalization == "domain":
        loss = jnp.sum(jnp.where(dom_cnt > 0, dom_sum / jnp.maximum(dom_cnt, 1.0), 0.0))
    else:
        loss = lm
    out = {"lm_loss": lm, "tokens": tokens, "seq_tokens": jnp.sum(batches["attention_mask"]),
           "domain_loss_sum": dom_sum, "domain_tokens": dom_cnt}
    examples = ms["examples"]                                                               # (NB,)
    for k in ("router_loss", "router_acc"):   # per-batch means over routed prompts -> one mean over all of them
        if k in ms:
            out[k] = jnp.sum(ms[k] * examples) / jnp.maximum(jnp.sum(examples), 1.0)
    if "router_loss" in out and tcfg.eta > 0:
        loss = loss + tcfg.eta * out["router_loss"]
    if "balance_loss" in ms:
        out["balance_loss"] = jnp.mean(ms["balance_loss"])
        loss = loss + tcfg.balance_coef * out["balance_loss"]
    out["loss"] = loss
    return out


def init_state(trainable: Params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                      rng=jax.random.PRNGKey(seed), nonfinite=jnp.zeros((), jnp.int32))
