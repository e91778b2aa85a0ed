"""Per-domain evaluation of one method: perplexity on response tokens, routing accuracy and the confusion matrix
(router decision vs domain label), and greedy generation (scored by moa_jax.evaluation_run with each domain's
verifier, BLEU-4 and ROUGE-L from moa_jax.metrics).

A "method" is a trained parameter tree plus how it routes:
  base         adapters off                    single_lora  stage-1 experts, the domain label picks the expert
  mixed_lora   one LoRA (E=1) for everything   moa_router   stage-2 experts, the routers decide from the prompt
  moa_oracle   stage-2 experts, label given    moe_lora     token-level top-k routing (no labels)
(The most_common baseline has no parameters: moa_jax.evaluation_run scores it directly.) An ablation variant of
a method keeps the method's name and routing and carries a `label` such as 'moa_router[eta0]'.
Router decisions are made exactly as at inference: a routing pass over the prompt tokens only, then the decided
expert for the whole sequence (so PPL under 'router' is what a user of the routed model gets).

Shape glossary: B batch, T tokens, N domains (= experts E for MoA), L layers.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax.config import ModelConfig, MoAConfig
from moa_jax.generate import generate_tokens, left_pad
from moa_jax.model import MoATransformer
from moa_jax.router import decide
from moa_jax.train_step import gather_targets, lm_loss_terms

ROUTING_OF_METHOD = {"base": "base", "single_lora": "oracle", "mixed_lora": "forced", "moa_router": "router",
                     "moa_oracle": "oracle", "moe_lora": "router"}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str                 # one of ROUTING_OF_METHOD
    moa: Optional[MoAConfig]
    params: Any               # full tree (frozen base merged with this method's adapters)
    label: str = ""           # how reports name it (default: name)

    @property
    def routing(self) -> str:
        return ROUTING_OF_METHOD[self.name]

    @property
    def display(self) -> str:
        return self.label or self.name


@functools.lru_cache(maxsize=None)
def _loss_fn(cfg: ModelConfig, moa: Optional[MoAConfig], routing: str, num_domains: int):
    model = MoATransformer(cfg, moa)

    @jax.jit
    def run(params, batch):
        tokens, mask, pmask, domain = batch["tokens"], batch["attention_mask"], batch["prompt_mask"], batch["domain"]
        decided = jnp.full(domain.shape, -1, jnp.int32)
        if routing == "base" or moa is None:
            mode, idx = "base", None
        elif routing == "forced":
            mode, idx = "fixed", jnp.zeros_like(domain)
        elif routing == "oracle":
            mode, idx = "fixed", domain
        elif moa.dispatch == "top1":   # router: decide from the prompt, then run the sequence with that expert
            _, aux = model.apply({"params": params}, tokens, attention_mask=mask, prompt_mask=pmask, routing="self")
            decided = decide(aux["router_logits"], moa.decision)
            mode, idx = "fixed", decided
        else:
            mode, idx = ("soft" if moa.dispatch == "soft" else "token"), None
        logits, _ = model.apply({"params": params}, tokens, attention_mask=mask, prompt_mask=pmask, routing=mode,
                                expert_idx=idx, logits_at=batch["target_pos"])                 # (B, K, V)
        weights = batch["target_weight"] * batch["valid"][:, None]
        _, _, dom_sum, dom_cnt = lm_loss_terms(logits, batch["target_tokens"], weights, domain, num_domains)
        return dom_sum, dom_cnt, decided
    return run


def perplexity_and_routing(cfg: ModelConfig, method: Method, batches: Sequence[dict], num_domains: int) -> dict:
    """-> {"nll": [N], "ppl": [N], "tokens": [N], "confusion": [N, E] or None} over all valid rows of `batches`."""
    fn = _loss_fn(cfg, method.moa, method.routing, num_domains)
    sums, counts = np.zeros(num_domains), np.zeros(num_domains)
    confusion = None
    if method.name == "moa_router" and method.moa is not None and method.moa.dispatch == "top1":
        confusion = np.zeros((num_domains, method.moa.num_experts), np.int64)
    for batch in batches:
        b = {k: jnp.asarray(v) for k, v in batch.items() if k in ("tokens", "attention_mask", "prompt_mask",
                                                                   "domain", "valid")}
        b["target_pos"], b["target_tokens"], b["target_weight"] = map(
            jnp.asarray, gather_targets(np.asarray(batch["tokens"]), np.asarray(batch["loss_mask"])))
        s, c, decided = jax.device_get(fn(method.params, b))
        sums += s
        counts += c
        if confusion is not None:
            valid = np.asarray(batch["valid"]).astype(bool)
            np.add.at(confusion, (np.asarray(batch["domain"])[valid], np.asarray(decided)[valid]), 1)
    nll = sums / np.maximum(counts, 1)
    return {"nll": nll, "ppl": np.exp(nll), "tokens": counts, "confusion": confusion}


def generate_answers(cfg: ModelConfig, method: Method, prompts: Sequence[Sequence[int]], domains: Sequence[int],
                     *, pad_id: int, eos_ids: Sequence[int], max_new_tokens: int, batch_size: int,
                     decode: Callable[[list[int]], str]) -> tuple[list[str], np.ndarray]:
    """Greedy answers for prompt token lists (mixed domains per batch). -> (texts, expert used per prompt).
    Every batch is padded to the same shape (the longest prompt of all), so decoding compiles once."""
    texts, experts = [], []
    longest = max(len(p) for p in prompts)
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        dom = np.asarray(domains[start:start + batch_size], np.int32)
        n = len(chunk)
        if n < batch_size:  # pad the last batch with copies: one compiled shape
            chunk += [chunk[0]] * (batch_size - n)
            dom = np.concatenate([dom, np.repeat(dom[:1], batch_size - n)])
        tokens, mask = left_pad(chunk, pad_id, length=longest)
        out, idx, _ = generate_tokens(cfg, method.moa, method.params, tokens, mask, routing=method.routing,
                                      expert=0 if method.routing == "forced" else None,
                                      domain=dom if method.routing == "oracle" else None,
                                      max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids))
        eos = set(eos_ids)
        for row in out[:n]:
            ids = [int(t) for t in row]
            cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
            texts.append(decode(ids[:cut]))
        experts.extend(int(e) for e in idx[:n])
    return texts, np.asarray(experts)
