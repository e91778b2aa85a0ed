"""Fit router outputs on cached router inputs of the plain base model (MoAConfig.route_on='probe').

With route_on='probe' every router reads a hidden state of the frozen base model, pooled over the prompt: its input
depends on no expert and no router. Fitting router outputs is then multinomial logistic regression on fixed features,
a convex problem, which a short SGD run leaves unconverged: add_domain's re-fit (20 steps of 8 rows) leaves a new
domain close to an old one (basic_arithmetic next to chain_sum) just below it, and stage 2 on 52 domains (40 steps of
8 rows, about 6 router examples a domain) routes 0.78. Here it is solved on cached features to convergence, at the
cost of one base forward per cached prompt. Two users: add_domain fits the new outputs (the old ones fixed), stage 2
with stage2.router_fit_prompts fits every output (num_old = 0; moa_jax/workflows/context.py fit_stage_routers).

How:
  1. router_inputs: one probe forward (adapters off) of each cached prompt gives every router's logits, which are
     linear in the router's final kernel K [L, F, E]; the pullback (VJP) of the logits w.r.t. K at one example's
     one-hot cotangent is that example's input to K in column 0. vmapped over the batch: features [N, L, F]
     (F = D for the linear router, router_hidden for the mlp router), with no change to the model.
  2. fit_new_outputs: the new columns K[..., E_old:] start from their current values and are fitted by full-batch
     Adam on the router CE of every layer (mean over layers), each domain weighted equally (so the number of cached
     prompts per domain is no prior), plus an L2 penalty; the old columns are never touched, so the old outputs
     stay bit-identical.
  3. fit_routers: both over the first prompts of every domain of an experiment's training split.

Shape glossary: N cached prompts, L layers, F features of a router's final kernel, E = E_old + E_new experts.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from moa_jax.config import ModelConfig, MoAConfig
from moa_jax.data.pipeline import collate_rows
from moa_jax.nn.model import MoATransformer
from moa_jax.params import merge_params
from moa_jax.train.step import base_router_logits

log = logging.getLogger("moa_jax")


def router_kernel_key(trainable) -> tuple:
    """The flattened key of every router's final kernel [L, F, E] in a trainable tree (linear: router/kernel, mlp:
    router/out/kernel)."""
    keys = [k for k in traverse_util.flatten_dict(trainable) if "router" in k and k[-1] == "kernel"
            and (k[-2] == "router" or k[-2] == "out")]
    if len(keys) != 1:
        raise ValueError(f"expected one final router kernel in the trainable tree, found {keys}")
    return keys[0]


def router_inputs(model, frozen, trainable, batch: dict) -> jax.Array:
    """The input of every router's final kernel for each row of `batch` (one example a row, right-padded, with
    prompt_mask) on the base model's forward: [B, L, F] float32."""
    flat = traverse_util.flatten_dict(trainable)
    key = router_kernel_key(trainable)

    def logits_of(kernel):                                                      # [L, F, E] -> [L, B, E]
        tree = traverse_util.unflatten_dict({**flat, key: kernel})
        return base_router_logits(model, merge_params(frozen, tree), batch)

    logits, pullback = jax.vjp(logits_of, flat[key])
    b = logits.shape[1]
    onehot = jnp.zeros((b, *logits.shape), logits.dtype)                        # [B, L, B, E]: example i, expert 0
    onehot = onehot.at[jnp.arange(b), :, jnp.arange(b), 0].set(1.0)
    (per_example,) = jax.vmap(pullback)(onehot)                                  # [B, L, F, E]
    return per_example[..., 0]


def fit_new_outputs(features: np.ndarray, labels: np.ndarray, kernel: np.ndarray, num_old: int, *,
                    steps: int = 300, learning_rate: float = 1e-2, l2: float = 1e-4) -> tuple[np.ndarray, dict]:
    """features [N, L, F], labels [N] in [0, E), kernel [L, F, E] -> (kernel with columns num_old.. fitted, stats).

    Objective: mean over layers of the class-balanced CE of features @ kernel, plus l2 * |new columns|^2; the old
    columns are constants. stats: the objective and the last layer's training accuracy before and after."""
    x = jnp.asarray(features, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    num_experts = kernel.shape[-1]
    counts = np.bincount(np.asarray(labels), minlength=num_experts).astype(np.float64)
    if (counts[num_old:] == 0).any():
        raise ValueError(f"no cached prompts for new expert(s) {np.flatnonzero(counts[num_old:] == 0) + num_old}")
    w = jnp.asarray(np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)[np.asarray(labels)], jnp.float32)
    w = w / jnp.sum(w)                                                          # [N]: each domain weighs the same
    old_logits = jnp.einsum("nlf,lfe->nle", x, jnp.asarray(kernel[..., :num_old], jnp.float32))
    data = (x, y, w, old_logits)   # jit arguments, not closed-over constants (XLA would constant-fold them)

    def logits(new, x, old_logits):
        return jnp.concatenate([old_logits, jnp.einsum("nlf,lfe->nle", x, new)], axis=-1)   # [N, L, E]

    @jax.jit
    def objective(new, x, y, w, old_logits):
        logp = jax.nn.log_softmax(logits(new, x, old_logits), axis=-1)
        nll = -jnp.take_along_axis(logp, y[:, None, None], axis=-1)[..., 0]               # [N, L]
        return jnp.sum(w[:, None] * nll) / nll.shape[1] + l2 * jnp.sum(jnp.square(new))

    @jax.jit
    def last_accuracy(new, x, y, w, old_logits):
        return jnp.mean((jnp.argmax(logits(new, x, old_logits)[:, -1], -1) == y).astype(jnp.float32))

    tx = optax.adam(learning_rate)

    @jax.jit
    def run(new, *data):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(objective)(params, *data)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None
        (params, _), _ = jax.lax.scan(step, (new, tx.init(new)), None, length=steps)
        return params

    start = jnp.asarray(kernel[..., num_old:], jnp.float32)
    fitted = run(start, *data)
    stats = {"objective_before": float(objective(start, *data)), "objective_after": float(objective(fitted, *data)),
             "last_router_train_accuracy_before": float(last_accuracy(start, *data)),
             "last_router_train_accuracy_after": float(last_accuracy(fitted, *data)),
             "examples": int(len(labels)), "steps": steps}
    out = np.array(kernel, copy=True)
    out[..., num_old:] = np.asarray(fitted, out.dtype)
    return out, stats


def fit_routers(cfg: ModelConfig, moa: MoAConfig, frozen, data, trainable, n_old: int, prompts_per_domain: int, *,
                batch_size: int, buckets: Sequence[int]):
    """The routers' outputs n_old.. (n_old = 0: all of them) of `trainable` fitted on cached base-model router
    inputs (the model `cfg`/`moa` on the frozen base `frozen`) of the first `prompts_per_domain` prompts of every
    domain of the TokenizedSplit `data`, read in batches of `batch_size` padded to `buckets`. -> (trainable, stats)."""
    t0 = time.perf_counter()
    rows = np.concatenate([data.domain_rows(d)[:prompts_per_domain] for d in range(len(data.domains))])
    model = MoATransformer(cfg, moa)
    features_of = jax.jit(lambda frozen, tree, batch: router_inputs(model, frozen, tree, batch))
    features = [np.asarray(features_of(frozen, trainable, batch))[batch["valid"].astype(bool)]
                for batch in collate_rows(data, rows, batch_size, buckets)]
    flat = traverse_util.flatten_dict(jax.device_get(trainable))
    key = router_kernel_key(trainable)
    flat[key], stats = fit_new_outputs(np.concatenate(features), data.domain[rows], np.asarray(flat[key]), n_old)
    stats.update(prompts_per_domain=prompts_per_domain, seconds=time.perf_counter() - t0)
    log.info("router fit on %d cached prompts: last-router train accuracy %.3f -> %.3f (%.0f s)",
             len(rows), stats["last_router_train_accuracy_before"], stats["last_router_train_accuracy_after"],
             stats["seconds"])
    return traverse_util.unflatten_dict(flat), stats
