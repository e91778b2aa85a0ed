"""The router sidecar of a PEFT export (moa_jax.export.export_peft): router.json, which records everything a server
needs to route a prompt as moa_jax does, the training tokenizer (tokenizer/) and, for servable routers, copies of
moa_jax/reference_router.py (transformers + torch only) that follows router.json and moa_jax/route_serve.py (the
OpenAI-compatible routing front end, standard library + that router).

router.json (format "moa_jax.router/1"):
  experts            expert names in expert order (= the PEFT adapter directories)
  base_model         where the trained base came from (an embedded model's Hub id); base_weights says whether
                     the experts were trained on other weights than that id's (the embedded Q4_1 GGUF)
  base_dir           the export's folder holding the trained base as a transformers checkpoint (null: none; then
                     base_model is the base to serve on)
  route_on, servable "probe": one forward of the plain base model routes (servable); "adapted": the routers read the
                     adapted model's routing pass (each layer routed by its own router), servable false
  hidden_state       which hidden state router l reads: transformers' hidden_states[l] (output_hidden_states=True;
                     the input of decoder layer l, index 0 = embeddings) through layer l's input_layernorm, float32
  pooling            mean over every prompt token (the formatted prompt, see prompt; no padding)
  decision           "last" | "vote" (and its rule)
  routing_policy     exit_layer k (routers 1..k decide; k = num_layers: every router), the calibration temperature,
                     abstain_below (0 = never) and fallback ("base" or an expert name), with the rule in words
  router             type linear | mlp, the tensors of router.safetensors [L, ...] and the formula
  prompt             format (chat | plain, moa_jax/data/prompt_format.py), chat_template, system_prompt, the plain
                     format's pieces, how the prompt is tokenised, the tokenizer/ folder

Shape glossary: L layers, D width, E experts, Hr mlp-router hidden width.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Optional, Sequence

import numpy as np

from moa_jax.routing import routes_on_probe
from moa_jax.config import ModelConfig, MoAConfig
from moa_jax.data.prompt_format import plain_record, resolve_prompt_format
from moa_jax.loading.resolve import HUB_IDS, hub_id
from moa_jax.names import check_name, inside

log = logging.getLogger("moa_jax")
FORMAT = "moa_jax.router/1"     # reference_router.FORMAT reads it
SERVER_FILES = ("reference_router.py", "route_serve.py")   # copied into a servable export (no moa_jax import)
NOT_GIVEN: Any = type("NotGiven", (), {"__repr__": lambda self: "NOT_GIVEN"})()
DECISION_RULES = {"last": "argmax of the last layer's logits",
                  "vote": "most frequent argmax over layers; ties to the larger mean softmax probability"}
POLICY_RULE = ("routers 1..exit_layer decide (the base forward may stop at layer exit_layer's input norm); the "
               "decision's probabilities are softmax(logits / temperature) ('vote': their mean over those routers); "
               "if the decided expert's probability is below abstain_below the prompt goes to fallback: 'base' = the "
               "base model with no adapter, else that expert")
ROUTER_FORMULAS = {"linear": "logits[l] = pooled[l] @ kernel[l]",
                   "mlp": "logits[l] = gelu_tanh(pooled[l] @ hidden/kernel[l]) @ out/kernel[l]"}


def router_spec(cfg: ModelConfig, moa: MoAConfig, names: Sequence[str], tensors: dict[str, np.ndarray],
                base_model: str, chat_template: Optional[str], system_prompt: Optional[str],
                tokenizer_dir: Optional[str], prompt_format: Optional[str] = "chat",
                plain: Optional[dict] = None, base_dir: Optional[str] = None) -> dict:
    """The contents of router.json (see the module docstring); plain: prompt_format.plain_record for plain;
    base_dir: the export's folder holding the trained base (None: the export names base_model alone)."""
    servable = routes_on_probe(moa)
    if base_dir:
        weights = (f"{base_dir}/ holds the weights the experts and routers were trained on ({base_model!r} as moa_jax "
                   f"loaded it" + (", the embedded Q4_1 GGUF dequantised)" if base_model in HUB_IDS else ")"))
    elif base_model in HUB_IDS:
        weights = (f"the experts and routers were trained on {base_model!r} (the embedded Q4_1 GGUF), not on the "
                   f"full-precision {HUB_IDS[base_model]!r}: routing and outputs can differ slightly")
    else:
        weights = "the base_model checkpoint itself"
    return {
        "format": FORMAT, "experts": list(names), "base_model": hub_id(base_model) if base_model else "",
        "base_dir": base_dir, "base_weights": weights,
        "route_on": moa.route_on, "servable": servable,
        "note": ("one forward of the plain base model over the prompt routes it (moa_jax reference_router.py)"
                 if servable else "NOT servable with a plain base forward: the routers read the adapted model's "
                 "routing pass (each layer routed by its own router); train with moa.route_on=probe to serve"),
        "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_state": {"source": "transformers output_hidden_states=True", "router_l_reads": "hidden_states[l]",
                         "index_convention": "hidden_states[l] is the input of decoder layer l; 0 = the embeddings",
                         "norm": "layer l's input_layernorm (RMSNorm, the base model's weight) applied first",
                         "dtype": "float32"},
        "pooling": {"kind": "mean", "over": "every prompt token (the prompt formatted as 'prompt' says: system "
                    "prompt included, chat's generation cue included); no padding, no response"},
        "decision": moa.decision, "decision_rule": DECISION_RULES[moa.decision],
        "routing_policy": {"exit_layer": moa.exit_layer if moa.exit_layer > 0 else cfg.num_layers,
                           "temperature": moa.temperature if moa.temperature > 0 else 1.0,
                           "abstain_below": max(moa.abstain_below, 0.0), "fallback": moa.fallback,
                           "rule": POLICY_RULE},
        "router": {"type": moa.router_type, "formula": ROUTER_FORMULAS[moa.router_type],
                   "activation": "gelu (tanh approximation)" if moa.router_type == "mlp" else None,
                   "tensors": {k: list(v.shape) for k, v in tensors.items()}},
        "router_type": moa.router_type, "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "prompt": {"format": prompt_format, "chat_template": chat_template, "system_prompt": system_prompt,
                   "add_generation_prompt": prompt_format == "chat", "plain": plain,
                   "system_rule": "the system prompt is prepended unless the messages hold a system turn",
                   "tokenize": ("apply_chat_template(messages, tokenize=False, add_generation_prompt=True), then "
                                "tokenizer(text, add_special_tokens=False)" if prompt_format != "plain" else
                                "the plain text of the messages (see plain.rule), then "
                                "tokenizer(text, add_special_tokens=False)"),
                   "tokenizer": tokenizer_dir},
    }


def write_router_sidecar(out_dir: str, tensors: dict[str, np.ndarray], cfg: ModelConfig, moa: MoAConfig,
                         names: Sequence[str], base_model: str, tokenizer, system_prompt: Any,
                         prompt_format: Optional[str] = None, base_dir: Optional[str] = None) -> dict:
    """router.json (+ tokenizer/ when a tokenizer is given, + reference_router.py and route_serve.py when servable).
    -> the spec. prompt_format: the run's "chat" | "plain" (None: chat iff the tokenizer has a chat template);
    base_dir: the export's folder holding the trained base (export_peft)."""
    for name in names:   # router.json's expert names name the adapter folders a server loads
        check_name(name, "router export: expert name")
    servable = routes_on_probe(moa)
    if servable and (tokenizer is None or system_prompt is NOT_GIVEN):
        raise ValueError("export_peft: a servable router (moa.route_on='probe') routes the formatted prompt, so "
                         "the export must record it: pass tokenizer= (the training tokenizer) and system_prompt= "
                         "(the run's system prompt, None for none)")
    if not servable:
        log.warning("export_peft: these routers (moa.route_on='adapted') read the adapted model's routing pass; a "
                    "server cannot reproduce them with one base-model forward (router.json says servable: false)")
    tokenizer_dir, plain = None, None
    if tokenizer is not None:
        prompt_format = resolve_prompt_format(prompt_format or "auto", tokenizer)
        plain = plain_record(tokenizer) if prompt_format == "plain" else None
        tokenizer_dir = "tokenizer"
        tokenizer.save_pretrained(inside(out_dir, tokenizer_dir))
    spec = router_spec(cfg, moa, names, tensors, base_model, getattr(tokenizer, "chat_template", None),
                       None if system_prompt is NOT_GIVEN else system_prompt, tokenizer_dir, prompt_format, plain,
                       base_dir)
    with open(inside(out_dir, "router.json"), "w") as f:
        json.dump(spec, f, indent=1)
    if servable:   # the router and the OpenAI-compatible routing front end, runnable from the export alone
        for name in SERVER_FILES:
            shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), inside(out_dir, name))
    return spec
