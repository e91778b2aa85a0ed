"""PEFT's Arrow routing over a run's experts, run by PEFT in torch (the `arrow` row of peer_routers.py).

  1. the base model as a plain transformers checkpoint: moa_jax.export.export_merged with all-zero adapters (the
     exact weights moa_jax ran on, dequantised when the base was a GGUF);
  2. the stage's experts as PEFT adapters: moa_jax.export.export_peft;
  3. `peft.create_arrow_model(base, adapter_dirs, ArrowConfig(top_k, router_temperature=1, rng_seed=0))`:
     PEFT loads the adapters, builds each module's expert prototypes (top right singular vector of B_e A_e) and
     routes every token in every adapted module to its top-k experts by |cosine| (softmax over them);
  4. per test item: greedy `generate` from the same prompt tokens moa_jax uses (left-padded batches), and the
     NLL of the reference response (teacher forcing, the same right-padded rows moa_jax scores).
Arrow's "routed expert" per prompt: the argmax of its routing weights averaged over the prompt's real tokens and
all adapted modules (`ArrowWeights`). PEFT does not expose the weights, so a forward pre-hook on every
ArrowLoraLinearLayer recomputes them from the layer's input with PEFT's own prototypes, top_k and temperature
(`arrow_coefficients`); tests/test_peer_routers.py checks that these weights reproduce the delta PEFT adds.
Those mean weights carry a large part that does not depend on the prompt: on moa_10task every domain's prompts give
leg_counting's expert the largest weight, while each domain's own expert weighs more on its own prompts than on the
others'. The `arrow_prior` row therefore divides each prompt's mean weights by their mean over TRAIN prompts (the
prior, `prior_weights`) and sends the whole sequence to the argmax: Arrow's prototypes as a sequence-level router of
ours, evaluated like the other routers (moa_jax runs the chosen expert); PEFT's Arrow itself never does this.

Shape glossary: B batch, T tokens, E experts, R rank, Din/Dout projection widths, N test items.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as benchmarks/peft_ref.py: torch on a shared CPU


def _torch():
    import torch
    torch.set_num_threads(2)
    return torch


def export_for_peft(run, out: str) -> tuple[str, list[str]]:
    """-> (transformers base checkpoint dir, one PEFT adapter dir per expert in expert order)."""
    import jax
    from moa_jax.export import export_merged, export_peft
    from moa_jax.params import merge_params
    zero = jax.tree_util.tree_map(np.zeros_like, run.trainable)
    base_dir = os.path.join(out, "arrow_base")
    export_merged(merge_params(run.frozen, zero), run.cfg, run.moa, 0, base_dir, tokenizer=run.tokenizer)
    dirs = export_peft(run.trainable, run.cfg, run.moa, os.path.join(out, "arrow_experts"),
                       expert_names=list(run.domains), base_model=run.exp.model, tokenizer=run.tokenizer,
                       system_prompt=run.system_prompt)
    return base_dir, dirs


def arrow_model(base_dir: str, adapter_dirs: list[str], top_k: int):
    """The PEFT Arrow model (eval mode, float32) over the adapters, in expert order (task_0 = expert 0, ...)."""
    _torch()
    from peft import ArrowConfig, create_arrow_model
    from transformers import AutoModelForCausalLM
    if not 1 <= top_k <= len(adapter_dirs):
        raise ValueError(f"arrow top_k={top_k} not in [1, {len(adapter_dirs)}] (the number of experts)")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    model = create_arrow_model(base, adapter_dirs, ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0))
    return model.eval()


def arrow_layers(model) -> list:
    """Every ArrowLoraLinearLayer of the model (one per adapted projection)."""
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer
    return [m for m in model.modules() if isinstance(m, ArrowLoraLinearLayer)]


def arrow_coefficients(layer, x):
    """PEFT's Arrow routing weights of `layer` for its input x [..., Din] -> [tokens, E] (rows sum to 1):
    |x . prototype_e|, top_k kept, softmax over them at the layer's temperature."""
    torch = _torch()
    tok = x.reshape(-1, x.shape[-1]).to(layer.prototypes.dtype)
    sim = torch.abs(tok @ layer.prototypes.T)                                           # (t, E)
    top_v, idx = torch.topk(sim, layer.top_k, dim=1)
    score = torch.full_like(sim, float("-inf")).scatter(1, idx, top_v)
    return torch.softmax(score / layer.temperature, dim=1)


class ArrowWeights:
    """While active: every Arrow layer's routing weights of each forward, summed over layers -> `mean(mask)`."""

    def __init__(self, model):
        self.layers, self.handles, self.total, self.count = arrow_layers(model), [], None, 0

    def __enter__(self):
        def hook(layer, args):
            w = arrow_coefficients(layer, args[0]).reshape(*args[0].shape[:-1], -1)     # (B, T, E)
            self.total = w if self.total is None else self.total + w
            self.count += 1
        self.handles = [m.register_forward_pre_hook(hook) for m in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def mean(self, mask) -> np.ndarray:
        """[B, E]: the weights averaged over the modules and the real tokens (mask [B, T])."""
        m = mask.to(self.total.dtype)[..., None]
        return ((self.total / self.count) * m).sum(1).div(m.sum(1).clamp(min=1.0)).numpy()


def prompt_weights(model, prompts: list, pad: int, batch_size: int) -> np.ndarray:
    """Arrow's mean routing weights of each prompt (token lists) -> [N, E], batches left-padded."""
    from moa_jax.generate.decode import left_pad
    torch = _torch()
    out = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            tokens, mask = (torch.from_numpy(a.astype(np.int64)) for a in left_pad(prompts[start:start + batch_size],
                                                                                     pad))
            with ArrowWeights(model) as w:
                model(input_ids=tokens, attention_mask=mask)
            out.append(w.mean(mask))
    return np.concatenate(out)


def prior_normalized(weights: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """[N, E] mean weights, [E] their mean over train prompts -> [N] argmax of weights / prior."""
    return np.argmax(weights / np.maximum(prior, 1e-12), axis=-1).astype(np.int64)


def evaluate_arrow(run, *, top_k: int, scratch: str, prior_prompts: list) -> dict:
    """Arrow on the run's test items -> an entry like moa_jax.eval.suite's (scores by the same verifier), with
    `experts` (its routed expert per item), `confusion`, `routing_seconds`, `how`, and `prior_weights` (the mean
    weights over `prior_prompts`, train prompts as token lists) with `prior_experts` (prior_normalized's choice).
    The routing and the answers go to scratch/ROUTING_FILE before the PPL pass (the longest, most memory-hungry
    part over many experts)."""
    import peft
    from moa_jax.eval import metrics
    from moa_jax.eval.suite import method_entry, score_texts
    from moa_jax.generate.decode import eos_ids, left_pad, until_eos
    torch = _torch()
    t0 = time.perf_counter()
    es, pad = run.es, run.train.pad_id
    base_dir, dirs = export_for_peft(run, scratch)
    model = arrow_model(base_dir, dirs, top_k)
    eos, bs = list(eos_ids(run.tokenizer)), run.exp.eval.batch_size
    prior = prompt_weights(model, prior_prompts, pad, bs).mean(axis=0)                              # (E,)
    weights, texts, arrow_s, base_s = [], [], 0.0, 0.0
    with torch.inference_mode():
        for start in range(0, len(es.prompts), bs):
            tokens, mask = (torch.from_numpy(a.astype(np.int64)) for a in left_pad(es.prompts[start:start + bs], pad))
            with model.disable_adapter():                     # the plain base forward: the cost baseline
                t = time.perf_counter()
                model(input_ids=tokens, attention_mask=mask)
                base_s += time.perf_counter() - t
            with ArrowWeights(model) as w:                    # the Arrow prompt forward: its routing weights
                t = time.perf_counter()
                model(input_ids=tokens, attention_mask=mask)
                arrow_s += time.perf_counter() - t
            weights.append(w.mean(mask))
            out = model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=run.exp.eval.max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad)
            texts += [run.tokenizer.decode(until_eos(row[tokens.shape[1]:].tolist(), eos), skip_special_tokens=True)
                      for row in out]
        mean_w = np.concatenate(weights)                                                             # (N, E)
        experts = np.argmax(mean_w, axis=-1).astype(np.int64)                                        # (N,)
        prior_experts = prior_normalized(mean_w, prior)                                              # (N,)
        with open(os.path.join(scratch, ROUTING_FILE), "w") as f:   # kept if the PPL pass below dies
            json.dump({"experts": experts.tolist(), "mean_weights": mean_w.tolist(),
                       "prior_weights": prior.tolist(), "prior_experts": prior_experts.tolist(),
                       "labels": np.asarray(es.labels).tolist(), "texts": texts,
                       "arrow_forward_seconds": arrow_s, "base_forward_seconds": base_s}, f)
        sums, counts = [], []
        for batch in es.batches:                              # NLL of the response tokens, as moa_jax scores it
            valid = np.asarray(batch["valid"]).astype(bool)
            ids = torch.from_numpy(np.asarray(batch["tokens"]).astype(np.int64))
            logits = model(input_ids=ids, attention_mask=torch.from_numpy(
                np.asarray(batch["attention_mask"]).astype(np.int64))).logits[:, :-1].float()
            # -log_softmax at the next token, without a second [B, T, vocab] tensor
            nll = (torch.logsumexp(logits, -1) - logits.gather(-1, ids[:, 1:, None])[..., 0]).numpy()   # (B, T-1)
            del logits
            wt = np.asarray(batch["loss_mask"])[:, 1:].astype(np.float64)
            sums.append((nll * wt).sum(1)[valid])
            counts.append(wt.sum(1)[valid])
    sums, counts = np.concatenate(sums), np.concatenate(counts)
    per_domain = score_texts(es, texts)
    for d, name in enumerate(es.domains):
        sel = es.labels == d
        nll = float(sums[sel].sum() / max(counts[sel].sum(), 1.0))
        per_domain[name].update(ppl=float(np.exp(nll)), nll=nll)
    confusion = metrics.confusion_matrix(es.labels, experts, len(es.domains), run.moa.num_experts)
    for name, acc in zip(es.domains, metrics.routing_accuracy(confusion)):
        per_domain[name]["routing_accuracy"] = float(acc)
    entry = method_entry(es, ARROW_KIND, "arrow", per_domain, texts, time.perf_counter() - t0)
    entry.update(confusion=confusion.tolist(), experts=experts.tolist(), mean_weights=mean_w.tolist(),
                 prior_weights=prior.tolist(), prior_experts=prior_experts.tolist(), prior_prompts=len(prior_prompts),
                 routing_seconds=max(arrow_s - base_s, 0.0), arrow_forward_seconds=arrow_s, base_forward_seconds=base_s,
                 implementation=f"peft {peft.__version__} create_arrow_model, ArrowConfig(top_k={top_k}, "
                                f"router_temperature=1.0, rng_seed=0), torch {torch.__version__}",
                 how=f"PEFT Arrow, top-{top_k} experts per token in every adapted module (routed expert: largest "
                     f"mean weight over the prompt)")
    return entry


ARROW_KIND = "arrow"
ROUTING_FILE = "arrow_routing.json"   # Arrow's routing and answers, written before its PPL pass
