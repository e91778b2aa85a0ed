"""Reference router of an exported MoA model: picks the expert (the PEFT adapter to name) for a prompt from ONE
forward of the plain base model, with transformers, torch and numpy only (no jax, flax or moa_jax import).
`moa_jax.export.export_peft` copies this file into a servable export directory, so a server needs that directory
and the base model alone (an export holding base/, the weights training used, needs nothing else):

    import reference_router    # the copy in the export directory (moa_jax.reference_router needs moa_jax's deps)
    router = reference_router.load("export/")    # router.json + router.safetensors + tokenizer/ + base/
    router.route("What is 2 + 3?")               # -> "chain_sum": generate with the adapter of that name
    router.route([{"role": "user", "content": "Spell 'cat' backward"}])
    router.route_batch(["What is 2 + 3?", "Spell 'cat' backward"])   # one padded forward for many prompts

It computes what router.json records (written for MoAConfig.route_on='probe'; see docs/method.md):
  1. prompt ids: the messages with the recorded system prompt first (unless they hold a system turn), rendered to
     text in the recorded prompt format and tokenised WITHOUT adding special tokens (how moa_jax tokenised its
     training and test prompts): "chat", the recorded chat template with the generation cue; "plain" (base models
     without a template), the recorded bos_token, then each message's content followed by system_end (a system
     message; nothing if it is empty) or turn_end (any other) - moa_jax/data/prompt_format.py's plain_text;
  2. one forward of the base model (output_hidden_states=True, no LM head): router l reads hidden_states[l] (the
     input of decoder layer l; index 0 = the token embeddings) through layer l's input_layernorm, in float32;
  3. mean over every prompt token -> pooled [L, D]; logits[l] = router_l(pooled[l]) -> [L, E] (linear:
     pooled @ kernel[l]; mlp: gelu_tanh(pooled @ hidden/kernel[l]) @ out/kernel[l]);
  4. decision 'last': argmax of the last router; 'vote': the most frequent argmax over layers, ties to the larger
     mean softmax probability;
  5. router.json's routing_policy: with exit_layer k < L only routers 1..k decide ('last' = router k) and the base
     forward stops at layer k's input norm (early exit: layers k..L never run); the decision's probabilities
     (softmax of the logits divided by the calibration temperature; 'vote': their mean over routers) give the
     confidence, and below abstain_below the prompt goes to the fall-back: route() returns None for the base model
     (generate without an adapter) or the named expert.
Several prompts route in one right-padded forward (logits_batch / route_batch), equal to one at a time.
The routers were trained on the base weights moa_jax loaded (base/ when the export holds it: base_of); a server
whose base differs (e.g. full precision instead of the embedded Q4_1 GGUF) can route differently: run this module
on your prompts to check.

Shape glossary: L layers, D width, E experts, T prompt tokens, Hr mlp-router hidden width.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

FORMAT = "moa_jax.router/1"
Prompt = Union[str, Sequence[dict]]


class RouterNotServableError(ValueError):
    """The export's routers read the adapted model (route_on='adapted'): one base-model forward cannot reproduce
    them."""


@dataclasses.dataclass
class ReferenceRouter:
    spec: dict                        # router.json
    weights: dict                     # router.safetensors: name -> float32 tensor with a leading L axis
    model: Any                        # the transformers causal LM (the base model)
    tokenizer: Any

    @property
    def experts(self) -> list[str]:
        return list(self.spec["experts"])

    def messages(self, prompt: Prompt) -> list[dict]:
        """A user message (str) or a messages list -> the conversation routing sees (the system prompt added)."""
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        system = self.spec["prompt"]["system_prompt"]
        if system is not None and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": system}] + msgs
        return msgs

    def prompt_text(self, prompt: Prompt) -> str:
        """The prompt as text in the recorded format (chat: template + system prompt + generation cue; plain: step 1
        of the module docstring). Exports written before router.json recorded a format are chat."""
        recorded = self.spec["prompt"]
        if recorded.get("format", "chat") == "plain":
            rule = recorded["plain"]
            return (rule["bos_token"] or "") + "".join(
                (m["content"] + rule["system_end"] if m["content"] else "") if m["role"] == "system"
                else m["content"] + rule["turn_end"] for m in self.messages(prompt))
        return self.tokenizer.apply_chat_template(self.messages(prompt), chat_template=recorded["chat_template"],
                                                  tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, formatted as in training (prompt_text, no special tokens added)."""
        return list(self.tokenizer(self.prompt_text(prompt), add_special_tokens=False)["input_ids"])

    @property
    def policy(self) -> dict:
        """router.json's routing_policy (exports written before it existed: every router, T = 1, never abstain)."""
        return {"exit_layer": self.spec["num_layers"], "temperature": 1.0, "abstain_below": 0.0, "fallback": "base",
                **self.spec.get("routing_policy", {})}

    def logits(self, prompt: Prompt) -> np.ndarray:
        """Router logits [k, E] float32 of one prompt (a str, a messages list, or token ids): routers 1..k, k the
        policy's exit_layer (logits_batch of one prompt)."""
        return self.logits_batch([prompt])[0]

    @torch.no_grad()
    def logits_batch(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """Router logits [N, k, E] float32 of N prompts in ONE right-padded forward that stops at layer k's input
        norm (k the policy's exit_layer; the layers after it never run). Row i equals logits(prompts[i]) to float
        rounding: with right padding and the attention mask a real token attends only to the real tokens before it
        and keeps its position, and the mean pools over real tokens only."""
        if len(prompts) == 0:
            raise ValueError("logits_batch: give at least one prompt")
        seqs = [list(p) if _is_ids(p) else self.prompt_ids(p) for p in prompts]
        ids = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.long)              # (N, T)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        decoder = self.model.get_decoder()
        device = next(self.model.parameters()).device
        k = int(self.policy["exit_layer"])
        normed: list = []

        def keep(module, inputs, output):   # layer l's input_layernorm(hidden_states[l]), (N, T, D)
            normed.append(output)
            if len(normed) == k:
                raise _ExitReached

        hooks = [decoder.layers[layer].input_layernorm.register_forward_hook(keep) for layer in range(k)]
        try:
            decoder(input_ids=ids.to(device), attention_mask=mask.to(device))
        except _ExitReached:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        weight = mask.to(device).unsqueeze(-1).float()                                     # (N, T, 1)
        rows = [self._router(layer, ((x.float() * weight).sum(dim=1) / weight.sum(dim=1)).cpu())   # (N, E) each
                for layer, x in enumerate(normed)]
        return torch.stack(rows, dim=1).numpy()                                             # (N, k, E)

    def route_batch(self, prompts: Sequence[Prompt]) -> list[Optional[str]]:
        """route() of each prompt, from one padded forward (logits_batch)."""
        return [self._name(self._decide(logits)) for logits in self.logits_batch(prompts)]

    def _router(self, layer: int, pooled: torch.Tensor) -> torch.Tensor:
        w = self.weights
        if self.spec["router"]["type"] == "mlp":
            hidden = torch.nn.functional.gelu(pooled @ w["hidden/kernel"][layer], approximate="tanh")
            return hidden @ w["out/kernel"][layer]
        return pooled @ w["kernel"][layer]

    def _decide(self, logits: np.ndarray) -> int:
        """Router logits [k, E] -> the expert id under the routing policy; -1: abstained to the base model."""
        p = self.policy
        fallback = -1 if p["fallback"] == "base" else self.experts.index(p["fallback"])
        return decide_or_abstain(logits, self.spec["decision"], float(p["temperature"]), float(p["abstain_below"]),
                                 fallback)[0]

    def _name(self, index: int) -> Optional[str]:
        return None if index < 0 else self.experts[index]

    def route_index(self, prompt: Prompt) -> int:
        """The expert id this prompt goes to; -1: it abstained to the base model (no adapter)."""
        return self._decide(self.logits(prompt))

    def route(self, prompt: Prompt) -> Optional[str]:
        """The name of the expert (PEFT adapter directory) this prompt goes to; None: generate with the base model
        alone (the prompt abstained and the fall-back is the base model)."""
        return self._name(self.route_index(prompt))


class _ExitReached(Exception):
    """Raised inside the base forward once the deciding routers' inputs are computed (early exit)."""


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def decide_or_abstain(logits: np.ndarray, policy: str, temperature: float = 1.0, abstain_below: float = 0.0,
                      fallback: int = -1) -> tuple[int, float]:
    """logits [k, E] -> (expert, calibrated confidence): the decision, or `fallback` (-1 = base model) when the
    confidence is below `abstain_below`. Confidence: softmax(logits[-1] / T) ('last') or the mean over routers of
    softmax(logits[l] / T) ('vote'), at the decided expert (moa_jax.nn.router.decide_or_abstain)."""
    chosen = decide(logits, policy)
    z = logits.astype(np.float32) / np.float32(temperature)
    probs = softmax(z[-1]) if policy == "last" else softmax(z).mean(axis=0)
    conf = float(probs[chosen])
    return (fallback if conf < abstain_below else chosen), conf


def decide(logits: np.ndarray, policy: str) -> int:
    """logits [L, E] -> the chosen expert (moa_jax.nn.router.decide for one sequence)."""
    if policy == "last":
        return int(np.argmax(logits[-1]))
    if policy == "vote":
        votes = np.bincount(np.argmax(logits, axis=-1), minlength=logits.shape[-1]).astype(np.float32)
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        tie_break = (z / z.sum(axis=-1, keepdims=True)).mean(axis=0)
        return int(np.argmax(votes + 0.5 * tie_break))
    raise ValueError(f"router.json: unknown decision policy {policy!r}; valid: 'last', 'vote'")


def read_spec(directory: str) -> dict:
    """router.json of an export directory, refused unless its routers can be served from a base-model forward."""
    path = os.path.join(directory, "router.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no router.json (not a directory written by moa_jax export_peft)")
    with open(path) as f:
        spec = json.load(f)
    if spec.get("format") != FORMAT:
        raise ValueError(f"{path}: format {spec.get('format')!r}, this reference router reads {FORMAT!r}; "
                         f"re-export with the current moa_jax")
    if not spec.get("servable"):
        raise RouterNotServableError(f"{path}: route_on={spec.get('route_on')!r}: these routers read the adapted "
                                     f"model's routing pass, which one base-model forward cannot reproduce; train "
                                     f"them with moa.route_on=probe (docs/method.md) and export again")
    return spec


def load(directory: str, base_model: Optional[str] = None, *, device: str = "cpu",
         dtype: torch.dtype = torch.float32, model: Any = None, tokenizer: Any = None) -> ReferenceRouter:
    """The reference router of an export directory. base_model: the base checkpoint (a Hub id or a directory;
    default base_of(directory), the base the export names); `model` / `tokenizer`: already loaded ones instead.
    The tokenizer defaults to the export's tokenizer/ folder (the one training used), else the base model's."""
    import transformers
    from safetensors.torch import load_file
    spec = read_spec(directory)
    weights = {k: v.float() for k, v in load_file(os.path.join(directory, "router.safetensors")).items()}
    if tokenizer is None:
        saved = spec["prompt"].get("tokenizer")
        source = _inside(directory, saved) if saved else (base_model or base_of(directory, spec))
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if model is None:
        # safetensors only: router.json names the base model, and a pickled checkpoint could run code on load.
        model = transformers.AutoModelForCausalLM.from_pretrained(base_model or base_of(directory, spec),
                                                                  dtype=dtype, use_safetensors=True)
        model = model.to(device).eval()
    layers = model.config.num_hidden_layers
    if layers != spec["num_layers"] or model.config.hidden_size != spec["hidden_size"]:
        raise ValueError(f"{directory}: the routers are for L={spec['num_layers']}, D={spec['hidden_size']} but "
                         f"the base model has L={layers}, D={model.config.hidden_size}")
    return ReferenceRouter(spec, weights, model, tokenizer)


def base_of(directory: str, spec: dict) -> str:
    """The base checkpoint an export names: router.json's base_dir (a folder inside the export holding the weights
    the routers were trained on, as a transformers checkpoint), else its base_model (a Hub id or a path)."""
    return _inside(directory, spec["base_dir"], "base folder") if spec.get("base_dir") else spec["base_model"]


def _inside(directory: str, relative: str, what: str = "tokenizer folder") -> str:
    """router.json's tokenizer folder, refused unless it lies inside the export directory (like moa_jax/names.py,
    which this file cannot import)."""
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(directory, relative))
    if os.path.isabs(relative) or os.path.commonpath([root, path]) != root:
        raise ValueError(f"{directory}/router.json: {what} {relative!r} lies outside the export directory")
    return path


def _is_ids(prompt) -> bool:
    return (isinstance(prompt, (list, tuple, np.ndarray)) and len(prompt) > 0
            and isinstance(prompt[0], (int, np.integer)))
