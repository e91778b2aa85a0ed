"""The PyTorch + PEFT reference, timed in the same process as ours (the measurement rules in BENCHMARKS.md).

The same tiny Llama is built from a `transformers.LlamaConfig` (nothing downloaded) and OUR random weights are
copied into it (torch Linear weight = our kernel transposed), so both sides compute the same function: the suite
records the max |logits difference| of the mixed-domain forward as a parity check. PEFT LoRA sits on the same
projections with the same rank and scale (lora_alpha / r), dropout 0, float32, `torch.set_num_threads(2)`,
SDPA attention (transformers' default, PEFT at its best). Programs:
  frozen      fwd + backward w.r.t. the input embeddings only (no weight requires grad): our frozen definition.
  single      one adapter: forward, HF masked-LM loss (labels -100 off the response), backward, clip, AdamW.
  mixed loop  PEFT's only way to TRAIN on a mixed-domain batch: for each domain present, `set_adapter` and
              forward/backward its sub-batch (loss summed over all tokens / all tokens of the batch), then one
              clip + AdamW step over every adapter.
  infer       forward logits: base (adapters disabled), one adapter, mixed batch via `adapter_names=`.
OMP_WAIT_POLICY=PASSIVE is set by `benchmarks/__init__.py` before torch loads (see there).

Shape glossary: B batch, T tokens, D width, E experts (adapters), R rank.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

# OpenMP threads that spin while waiting (the default) collapse on a shared, oversubscribed machine: measured on
# the 2-core box under load ~6, PEFT's mixed-adapter forward took 12-15 s per call instead of 0.28 s, varying
# 25x between rounds. Passive waiting is torch at its best here; it must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.timing import Variant


def _torch():
    """torch, with 2 intra-op threads (the measurement rules: torch threads = 2)."""
    import torch
    torch.set_num_threads(2)
    return torch


def _t(x) -> Any:
    return _torch().from_numpy(np.array(x, np.float32))        # a writable host copy


def llama_config(cfg):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                       head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                       tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias,
                       max_position_embeddings=cfg.max_position_embeddings, torch_dtype="float32")


def torch_model(cfg, params):
    """A transformers LlamaForCausalLM holding our base weights (params: our full or frozen tree)."""
    torch = _torch()
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(cfg)).float()
    lay = params["layers"]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(_t(params["embed"]["embedding"]))
        model.model.norm.weight.copy_(_t(params["final_norm"]["scale"]))
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(_t(params["lm_head"]["kernel"]).T)
        for i, layer in enumerate(model.model.layers):
            layer.input_layernorm.weight.copy_(_t(lay["input_norm"]["scale"][i]))
            layer.post_attention_layernorm.weight.copy_(_t(lay["post_attn_norm"]["scale"][i]))
            for block, mod in (("attn", layer.self_attn), ("mlp", layer.mlp)):
                for name, sub in lay[block].items():
                    getattr(mod, name).weight.copy_(_t(sub["kernel"][i]).T)
    model.config.use_cache = False
    return model


def add_adapters(model, cfg, moa, trainable, num: int):
    """Wrap with PEFT LoRA adapters e0..e{num-1}, copying our experts 0..num-1 (lora_a/lora_b per layer)."""
    torch = _torch()
    from peft import LoraConfig, get_peft_model
    lcfg = LoraConfig(r=moa.rank, lora_alpha=moa.alpha, lora_dropout=moa.dropout, target_modules=list(moa.targets),
                      bias="none", use_rslora=moa.use_rslora)
    peft_model = get_peft_model(model, lcfg, adapter_name="e0")
    for e in range(1, num):
        peft_model.add_adapter(f"e{e}", lcfg)
    lay = trainable["layers"]
    with torch.no_grad():
        for i, layer in enumerate(peft_model.base_model.model.model.layers):
            for block, mod in (("attn", layer.self_attn), ("mlp", layer.mlp)):
                for name in moa.targets:
                    if name not in lay[block]:
                        continue
                    lin = getattr(mod, name)
                    for e in range(num):
                        lin.lora_A[f"e{e}"].weight.copy_(_t(lay[block][name]["lora_a"][i, e]).T)
                        lin.lora_B[f"e{e}"].weight.copy_(_t(lay[block][name]["lora_b"][i, e]).T)
    return peft_model


def torch_batch(batch) -> dict:
    """Our batch [1, B, T] (numpy-able) -> torch ids [B, T], labels (-100 off the loss mask), domains [B]."""
    torch = _torch()
    tokens = np.asarray(batch["tokens"][0])
    labels = np.where(np.asarray(batch["loss_mask"][0]) > 0, tokens, -100)
    return {"ids": torch.from_numpy(tokens.astype(np.int64)), "labels": torch.from_numpy(labels.astype(np.int64)),
            "domain": np.asarray(batch["domain"][0])}


def _cycle(batches):
    state = {"i": 0}

    def nxt():
        state["i"] += 1
        return batches[state["i"] % len(batches)]
    return nxt


def frozen_variant(name, cfg, params, batches) -> Variant:
    torch = _torch()
    model = torch_model(cfg, params)
    model.requires_grad_(False)
    model.train()
    nxt = _cycle([torch_batch(b) for b in batches])

    def run():
        b = nxt()
        emb = model.model.embed_tokens(b["ids"]).detach().requires_grad_(True)
        loss = model(inputs_embeds=emb, labels=b["labels"]).loss
        loss.backward()
        return emb.grad
    return Variant(name, run)


def _optimizer(peft_model):
    torch = _torch()
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    return params, torch.optim.AdamW(params, lr=1e-4, foreach=True)


def _training_setup(cfg, params, moa, trainable, num_adapters: int, batches):
    """A PEFT model with `num_adapters` adapters in train mode, AdamW over its LoRA weights, and a cycle over
    the batches as torch tensors. -> (torch, peft_model, lora_params, optimizer, next_batch)."""
    torch = _torch()
    peft_model = add_adapters(torch_model(cfg, params), cfg, moa, trainable, num_adapters)
    peft_model.train()
    lora_params, opt = _optimizer(peft_model)
    return torch, peft_model, lora_params, opt, _cycle([torch_batch(b) for b in batches])


def _clip_and_step(torch, lora_params, opt) -> None:
    torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def single_variant(name, cfg, params, moa, trainable, batches) -> Variant:
    """One adapter (our expert 0) trained on the whole batch: the standard PEFT LoRA step."""
    torch, peft_model, lora_params, opt, nxt = _training_setup(cfg, params, moa, trainable, 1, batches)

    def run():
        b = nxt()
        loss = peft_model(input_ids=b["ids"], labels=b["labels"]).loss
        loss.backward()
        _clip_and_step(torch, lora_params, opt)
        return loss
    return Variant(name, run)


def mixed_loop_variant(name, cfg, params, moa, trainable, batches) -> Variant:
    """Mixed-domain training, PEFT's only way: loop over the experts present, set_adapter, fwd/bwd each
    sub-batch; one optimiser step over all adapters."""
    torch, peft_model, lora_params, opt, nxt = _training_setup(cfg, params, moa, trainable, moa.num_experts,
                                                                batches)

    def run():
        b = nxt()
        total = float((b["labels"][:, 1:] != -100).sum())
        for e in np.unique(b["domain"]):
            rows = torch.from_numpy(np.nonzero(b["domain"] == e)[0])
            peft_model.set_adapter(f"e{int(e)}")
            logits = peft_model(input_ids=b["ids"][rows]).logits[:, :-1]
            labels = b["labels"][rows][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum") / total
            loss.backward()
        _clip_and_step(torch, lora_params, opt)
        return loss
    return Variant(name, run)


def infer_variants(names: dict, cfg, params, moa, trainable, batches) -> tuple[list[Variant], Any]:
    """Forward logits. names: {'base': .., 'single': .., 'mixed': ..} -> variants; plus a parity function
    parity(our_logits_fn) -> max |ours - PEFT| on the mixed-domain batch 0."""
    torch = _torch()
    peft_model = add_adapters(torch_model(cfg, params), cfg, moa, trainable, moa.num_experts)
    peft_model.eval()
    tb = [torch_batch(b) for b in batches]
    nxt = _cycle(tb)
    out = []

    def mixed(b):
        return peft_model(input_ids=b["ids"], adapter_names=[f"e{int(d)}" for d in b["domain"]]).logits

    def base(b):
        with peft_model.disable_adapter():
            return peft_model(input_ids=b["ids"]).logits

    def single(b):
        peft_model.set_adapter("e0")
        return peft_model(input_ids=b["ids"]).logits

    for kind, fn in (("base", base), ("single", single), ("mixed", mixed)):
        if kind in names:
            def run(fn=fn):
                with torch.inference_mode():
                    return fn(nxt())
            out.append(Variant(names[kind], run))

    def parity(ours_logits) -> float:
        with torch.inference_mode():
            ref = mixed(tb[0]).numpy()
        return float(np.max(np.abs(np.asarray(ours_logits) - ref)))
    return out, parity
