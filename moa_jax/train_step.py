"""The pure training step: TrainState, the MoA loss, the optimiser, and `train_step(state, frozen, batch)`.

Loss = masked LM cross-entropy on response tokens + eta * mean over layers of the router CE against the domain
label (stage 2) [+ balance_coef * load-balancing loss for the token-level MoE-LoRA baseline]. Only the trainable
tree (experts + routers) gets gradients and optimiser state. Stage 1 is N independent single-domain trainings done
at once: the LM loss is the sum over domains of each domain's mean token loss, and gradients are clipped per
expert, so expert e's update depends on its own domain's samples only.

Batches carry a leading micro-batch axis A (gradient accumulation, a lax.scan):
  tokens, loss_mask, prompt_mask, attention_mask [A, B, T] int32;  domain [A, B] int32;  valid [A, B] (0 = pad row).
loss_mask[t] = 1 when token t is a target: logits[:, t-1] predict tokens[:, t].

Shape glossary: A micro-batches, B batch, T tokens, V vocab, L layers, E experts, N domains.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from moa_jax.config import MoAConfig, TrainConfig
from moa_jax.model import MoATransformer
from moa_jax.params import merge_params
from moa_jax.router import router_accuracy, router_ce_loss

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Params
    opt_state: optax.OptState
    rng: jax.Array
    nonfinite: jax.Array  # number of updates skipped because loss or gradients were not finite


def routing_mode(tcfg: TrainConfig) -> str:
    """The model's routing mode during training for this stage."""
    if tcfg.stage == "moe_lora":
        return "token"
    if tcfg.stage == "stage2":
        return {"label": "fixed", "router": "self", "soft": "soft"}[tcfg.train_routing]
    return "fixed"


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


def learning_rate_schedule(tcfg: TrainConfig) -> optax.Schedule:
    warmup = max(1, int(tcfg.warmup_frac * tcfg.steps))
    return optax.warmup_cosine_decay_schedule(0.0, tcfg.learning_rate, warmup, max(tcfg.steps, warmup + 1),
                                              tcfg.learning_rate * tcfg.end_lr_frac)


def make_optimizer(tcfg: TrainConfig, trainable: Params) -> optax.GradientTransformation:
    """AdamW + warmup-cosine, clipping, and zero updates (no state) for the groups frozen in this stage."""
    clip = clip_per_expert(tcfg.grad_clip) if tcfg.stage == "stage1" else optax.clip_by_global_norm(tcfg.grad_clip)
    adamw = optax.adamw(learning_rate_schedule(tcfg), weight_decay=tcfg.weight_decay)
    labels = traverse_util.unflatten_dict(
        {k: _param_group(k, tcfg) for k in traverse_util.flatten_dict(trainable)})
    groups = set(traverse_util.flatten_dict(labels).values())
    transforms = {g: optax.set_to_zero() if g == "frozen" else adamw for g in groups}
    return optax.chain(clip, optax.multi_transform(transforms, labels))


def lm_loss_terms(logits, tokens, loss_mask, domain, num_domains: int):
    """-> (per-token nll [B, T-1], weights [B, T-1], per-domain nll sums [N], per-domain token counts [N]).

    nll = logsumexp(logits) - logits[next token], with the target logit picked by a compare-and-sum that XLA
    fuses into one pass over the logits (its gradient is elementwise too): no [B, T-1, V] slice, log-softmax
    array, gather or scatter-into-zeros. The last position (no next token) is computed and dropped.
    """
    vocab = logits.shape[-1]
    nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))                                          # (B, T)
    lse = jax.nn.logsumexp(logits, axis=-1)                                                  # (B, T)
    picked = jnp.sum(jnp.where(jnp.arange(vocab) == nxt[..., None], logits, 0.0), axis=-1)  # (B, T)
    nll = (lse - picked)[:, :-1]                                                             # (B, T-1)
    w = loss_mask[:, 1:].astype(jnp.float32)
    onehot = jax.nn.one_hot(domain, num_domains, dtype=jnp.float32)                       # (B, N)
    dom_sum = onehot.T @ jnp.sum(nll * w, axis=1)
    dom_cnt = onehot.T @ jnp.sum(w, axis=1)
    return nll, w, dom_sum, dom_cnt


def loss_fn(trainable, frozen, batch, rng, *, model: MoATransformer, tcfg: TrainConfig, num_domains: int):
    """One micro-batch [B, T] -> (loss, aux metrics)."""
    params = merge_params(frozen, trainable)
    mode = routing_mode(tcfg)
    valid = batch["valid"].astype(jnp.float32)
    logits, aux = model.apply(
        {"params": params}, batch["tokens"], attention_mask=batch["attention_mask"],
        prompt_mask=batch["prompt_mask"], routing=mode, expert_idx=batch["domain"] if mode == "fixed" else None,
        deterministic=False, rngs={"dropout": rng})
    mask = batch["loss_mask"] * batch["valid"][:, None]
    nll, w, dom_sum, dom_cnt = lm_loss_terms(logits, batch["tokens"], mask, batch["domain"], num_domains)
    if tcfg.normalization == "domain":
        lm = jnp.sum(jnp.where(dom_cnt > 0, dom_sum / jnp.maximum(dom_cnt, 1.0), 0.0))
    else:
        lm = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    r_logits = aux["router_logits"]
    r_loss = router_ce_loss(r_logits, batch["domain"], valid)
    loss = lm
    if tcfg.stage == "stage2" and tcfg.eta > 0:
        loss = loss + tcfg.eta * r_loss
    if tcfg.stage == "moe_lora":
        loss = loss + tcfg.balance_coef * aux["balance_loss"]
    metrics = {"lm_loss_sum": jnp.sum(nll * w), "tokens": jnp.sum(w), "router_loss": r_loss,
               "router_acc": router_accuracy(r_logits, batch["domain"], valid),
               "balance_loss": aux["balance_loss"], "domain_loss_sum": dom_sum, "domain_tokens": dom_cnt}
    return loss, metrics


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
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(step=state.step + 1, trainable=keep(trainable, state.trainable),
                           opt_state=keep(opt_state, state.opt_state), rng=rng,
                           nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
    tokens = jnp.sum(ms["tokens"])
    metrics = {"loss": loss, "lm_loss": jnp.sum(ms["lm_loss_sum"]) / jnp.maximum(tokens, 1.0),
               "router_loss": jnp.mean(ms["router_loss"]), "router_acc": jnp.mean(ms["router_acc"]),
               "balance_loss": jnp.mean(ms["balance_loss"]), "grad_norm": grad_norm, "tokens": tokens,
               "domain_loss_sum": jnp.sum(ms["domain_loss_sum"], 0), "domain_tokens": jnp.sum(ms["domain_tokens"], 0),
               "finite": finite}
    return new_state, metrics


def init_state(trainable: Params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                      rng=jax.random.PRNGKey(seed), nonfinite=jnp.zeros((), jnp.int32))
