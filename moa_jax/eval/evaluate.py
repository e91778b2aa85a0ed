"""Per-item evaluation of one method: the expert each test item runs with, its NLL on the response tokens
(teacher forcing) and its greedy answer. moa_jax.eval.suite aggregates per domain and scores the answers
(each domain's verifier, BLEU-4 and ROUGE-L from moa_jax.eval.metrics).

A `Method` is a registered method (moa_jax/methods.py: its routing and which trained adapters it uses) with its
parameter tree. (The most_common baseline has no parameters: moa_jax.eval.suite scores it directly.) An ablation
variant of a method keeps the method's name and routing and carries a `label` such as 'moa_router[eta0]'.

Router decisions are made as at inference, once per item: a routing pass over the left-padded prompt tokens, as
`generate_tokens(routing='router')` does (`assign_experts`), then that expert for the whole sequence, in the PPL
pass and in generation alike. So every top-1 method is "one expert per item" and the evaluation is a function of
(parameters, item, expert): items that moa_router and moa_oracle run with the same expert are computed once
(eval/suite.py memoises them).

Shape glossary: B batch, T tokens, K target columns, V vocab, N test items, D domains, E experts, L layers.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.config import ModelConfig, MoAConfig
from moa_jax.generate.decode import forward_moa, generate_tokens, left_pad, route_from_prompt, until_eos
from moa_jax.methods import MethodInfo, method_info
from moa_jax.nn.entry import ModelInputs, lm_nll
from moa_jax.nn.model import MoATransformer
from moa_jax.params import merge_params
from moa_jax.routing import RoutePlan, resolve
from moa_jax.data.targets import gather_targets

BASE = -1   # expert id of "adapters off"


@dataclasses.dataclass(frozen=True)
class Method:
    """A method to evaluate (a name of moa_jax/methods.py METHODS, which gives its routing and adapters).

    moa     the MoAConfig it runs with (None: the base model, or the trained one until `resolve` fills it in; an
            ablation of the decision policy passes its own)
    params  the full tree (frozen base merged with its adapters); None until `resolve`
    label   how reports name it (default: name); an ablation variant is `name[VARIANT]`
    key     the trained tree its adapters come from (default: the registry's `trained`); a variant's own training
            is `moa[VARIANT]` or `moe_lora[VARIANT]`
    """
    name: str
    moa: Optional[MoAConfig] = None
    params: Any = None
    label: str = ""
    key: Optional[str] = None

    @property
    def info(self) -> MethodInfo:
        return method_info(self.name)

    @property
    def routing(self) -> str:
        return self.info.routing

    @property
    def display(self) -> str:
        return self.label or self.name

    @property
    def trained_key(self) -> Optional[str]:
        return self.key or self.info.trained

    @property
    def plan(self) -> RoutePlan:
        """How it routes (moa_jax.routing.resolve of its MoAConfig and the registry's routing)."""
        return resolve(self.moa, self.routing)

    @property
    def per_item_expert(self) -> bool:
        """True when every item runs with one expert (or the base) for its whole sequence; False for soft and
        token-level dispatch, which mix experts inside every forward."""
        return self.plan.per_item

    def resolve(self, frozen: Any, trained: dict) -> "Method":
        """This method with its parameters: the frozen base merged with its adapters from `trained`
        ({key: (MoAConfig, trainable tree)}, moa_jax/workflows/two_stage.py train_all)."""
        if self.trained_key is None:
            return dataclasses.replace(self, moa=None, params=frozen)
        moa, trainable = trained[self.trained_key]
        return dataclasses.replace(self, moa=self.moa or moa, params=merge_params(frozen, trainable))


def assign_experts(cfg: ModelConfig, method: Method, prompts: Sequence[Sequence[int]], labels: Sequence[int], *,
                   pad_id: int, batch_size: int, names: Sequence[str] = ()) -> Optional[np.ndarray]:
    """The expert each prompt's item runs with, [N] int (BASE = adapters off, an abstained prompt's base fall-back
    included); None for soft / token-level dispatch. 'router' routes exactly as `generate_tokens(routing='router')`
    does: a routing pass over the LEFT-padded prompt tokens, batches of `batch_size` padded to the longest prompt
    (one compiled shape), under the method's routing policy (names: the expert names, for a named fall-back)."""
    n, plan = len(prompts), method.plan
    if not plan.per_item:
        return None
    if plan.adapters_off:
        return np.full(n, BASE, np.int64)
    given = plan.given_experts(n, method.moa.num_experts, expert=0, labels=labels)   # forced: the one expert
    if given is not None:
        return given.astype(np.int64)
    out = []
    for _, k, tokens, mask in _prompt_batches(prompts, batch_size, pad_id, max(len(p) for p in prompts)):
        idx, _ = route_from_prompt(cfg, method.moa, method.params, jnp.asarray(tokens), jnp.asarray(mask),
                                   names=names)
        out.append(np.asarray(jax.device_get(idx), np.int64)[:k])
    return np.concatenate(out)


def _prompt_batches(prompts: Sequence[Sequence[int]], batch_size: int, pad_id: int, length: int):
    """Left-padded batches of `batch_size` prompts, all `length` wide, the last one filled with copies of its first
    prompt: one compiled shape. Yields (start, real rows n, tokens [B, P], attention mask [B, P])."""
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        n = len(chunk)
        tokens, mask = left_pad(chunk + [chunk[0]] * (batch_size - n), pad_id, length=length)
        yield start, n, tokens, mask


@functools.lru_cache(maxsize=None)
def _nll_fn(cfg: ModelConfig, moa: Optional[MoAConfig], plan: RoutePlan):
    model = MoATransformer(cfg, moa)

    @jax.jit
    def run(params, batch):
        nll, _ = lm_nll(model, params, ModelInputs.of(batch), batch["target_pos"], batch["target_tokens"],
                        mode=plan.mode, expert_idx=batch["expert"] if plan.needs_experts else None)   # (B, K)
        w = batch["target_weight"].astype(jnp.float32)
        return jnp.sum(nll * w, axis=1), jnp.sum(w, axis=1)                                     # (B,), (B,)
    return run


def item_nll(cfg: ModelConfig, method: Method, batches: Sequence[dict],
             experts: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """-> (NLL sum [N], target token count [N]) of every valid row of `batches` on its response tokens, each item
    run with its expert from `experts` [N] (None: the method's soft / token-level dispatch)."""
    plan = method.plan   # base / fixed when `experts` is given, else soft / token
    if plan.needs_experts and (np.asarray(experts) == BASE).any():
        # items that abstained to the base model: their NLL with the adapters off, the others' with their experts
        base = item_nll(cfg, dataclasses.replace(method, moa=None), batches, np.full(len(experts), BASE))
        routed = item_nll(cfg, method, batches, np.maximum(experts, 0))
        off = np.asarray(experts) == BASE
        return np.where(off, base[0], routed[0]), np.where(off, base[1], routed[1])
    # the experts are given, so the NLL pass never routes itself: one compiled forward per mode
    plan = RoutePlan(plan.mode, "labels" if plan.needs_experts else "none")
    fn = _nll_fn(cfg, None if plan.adapters_off else forward_moa(method.moa), plan)
    sums, counts, start = [], [], 0
    for batch in batches:
        valid = np.asarray(batch["valid"]).astype(bool)
        b = {k: jnp.asarray(batch[k]) for k in ("tokens", "attention_mask", "prompt_mask")}
        pos, tgt, wt = gather_targets(np.asarray(batch["tokens"]), np.asarray(batch["loss_mask"]))
        b.update(target_pos=jnp.asarray(pos), target_tokens=jnp.asarray(tgt), target_weight=jnp.asarray(wt))
        if plan.needs_experts:
            idx = np.zeros(len(valid), np.int32)
            idx[valid] = experts[start:start + int(valid.sum())]
            b["expert"] = jnp.asarray(idx)
        s, c = jax.device_get(fn(method.params, b))
        sums.append(np.asarray(s)[valid])
        counts.append(np.asarray(c)[valid])
        start += int(valid.sum())
    return np.concatenate(sums).astype(np.float64), np.concatenate(counts).astype(np.float64)


def generate_answers(cfg: ModelConfig, method: Method, prompts: Sequence[Sequence[int]],
                     experts: Optional[Sequence[int]], *, pad_id: int, eos_ids: Sequence[int], max_new_tokens: int,
                     batch_size: int, decode: Callable[[list[int]], str], pad_to: int = 0,
                     on_batch: Optional[Callable[[int], None]] = None) -> tuple[list[str], np.ndarray]:
    """Greedy answers for prompt token lists (mixed domains per batch), prompt i run with expert experts[i]
    (None: the method routes itself: router top-1 from the prompt, or soft / token-level dispatch).
    -> (texts, expert used per prompt). Every batch is padded to the same shape (the longest prompt, or `pad_to`
    if longer), so decoding compiles once. `on_batch(n)` is called after each batch of n prompts (progress)."""
    texts, used, plan = [], [], method.plan
    longest = max([pad_to] + [len(p) for p in prompts])
    for start, n, tokens, mask in _prompt_batches(prompts, batch_size, pad_id, longest):
        idx = None
        if experts is not None:   # the copies that fill the last batch run with its first prompt's expert
            idx = np.asarray(experts[start:start + n], np.int32)
            idx = np.concatenate([idx, np.repeat(idx[:1], batch_size - n)])
        if plan.adapters_off or (idx is not None and (idx == BASE).all()):
            routing, domain = "base", None
        elif idx is not None:   # the given experts, one per row
            routing, domain = "oracle", np.maximum(idx, 0)
        else:
            routing, domain = method.routing, None
        # expert=0: the one expert of a forced method (read only by its plan)
        out, chosen, _ = generate_tokens(cfg, method.moa, method.params, tokens, mask, routing=routing, expert=0,
                                         domain=domain,
                                         max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids))
        if routing == "oracle" and (idx == BASE).any():   # rows that abstained to the base model: its answers
            base_out, _, _ = generate_tokens(cfg, method.moa, method.params, tokens, mask, routing="base",
                                             max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids))
            out, chosen = np.where((idx == BASE)[:, None], base_out, out), idx
        texts.extend(decode(until_eos(row, eos_ids)) for row in out[:n])
        used.extend(int(e) for e in chosen[:n])
        if on_batch is not None:
            on_batch(n)
    return texts, np.asarray(used)
