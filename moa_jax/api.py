"""The notebook-facing API: load a base model, attach MoA experts, get logits, route and generate text.

    model = moa_jax.load_model("smollm2-135m-instruct", moa=moa_jax.MoAConfig(num_experts=10, rank=16))
    logits = model.logits(ids, routing="forced", expert=3)        # numpy [B, T, V]
    outs = model.generate(["What is 2 + 3?"], max_new_tokens=16)  # text + chosen expert per prompt
    outs = model.generate(["Tell a story"], temperature=0.8, top_p=0.9, seed=1)   # sampled (nucleus)
    for piece in model.generate_stream("What is 2 + 3?"):         # the same answer, piece by piece as decoded
        print(piece.text, end="")
    small = moa_jax.load_model("smollm2-135m-instruct", quantize="int8")  # int8 frozen projections
    run = moa_jax.load_run("runs/moa_10task")                     # a finished run's stage 2, ready to generate
    run.export_peft("export/")                                    # one PEFT adapter per domain + the routers
    run.save_pretrained("my-moa")                                 # experts, routers, config: one folder
    same = moa_jax.from_pretrained("my-moa")                      # rebuilt (base model from the recorded source)

`source` is the embedded model's name, a Hugging Face checkpoint directory (Llama / Mistral / Qwen2), a .gguf
file or a Hub id. `moa=None` gives the plain base model. Experts start fresh (lora_b = 0, so the model equals its
base) unless `adapters=` names a directory written by training (`<workdir>/<stage>/adapters`): then the MoA
config, the expert (domain) names and the system prompt come from that artifact (moa_jax/run_artifacts.py).

System prompts: `encode_prompt` and `generate` take system_prompt="auto" (default: the model's own
`system_prompt`, i.e. the one the run trained with, None for a plain base model), None (no system turn: the chat
template's default applies) or any string (even "", an empty system turn), as DataConfig.system_prompt does.
Prompt format: the model's `prompt_format` ("chat" | "plain", moa_jax/data/prompt_format.py), the one the run
trained with; None (a base model or PEFT experts) means chat when the tokenizer has a chat template, else plain.

Shape glossary: B batch, T tokens, V vocab, L layers, E experts.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moa_jax.config import ModelConfig, MoAConfig, replace, stage_keys
from moa_jax.errors import UserError, check_rank_fits
from moa_jax.eval.calibration import applied_routing_policy
from moa_jax.generate.decode import (eos_ids, generate_tokens, left_pad, route_from_prompt, sequence_experts,
                                     until_eos)
from moa_jax.generate.sampling import check_sampling
from moa_jax.generate.stream import TextPiece, stream_text
from moa_jax.loading.base import default_dtype, load_base_model
from moa_jax.nn import entry
from moa_jax.nn.model import MoATransformer
from moa_jax.peft_import import read_peft_experts
from moa_jax.run_artifacts import (adapter_moa, check_adapter_dir, expert_names, read_run, training_prompt_format,
                                   training_system_prompt)
from moa_jax.params import check_tree, init_trainable, merge_params, param_shapes, split_params
from moa_jax.nn.quantize import check_quantize
from moa_jax.routing import resolve


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str
    expert: int          # the expert used for this prompt (-1: base model / token-level routing)
    token_ids: tuple


@dataclasses.dataclass
class MoAModel:
    """A base model with its experts and routers in one parameter tree (`params`), ready for logits, routing,
    generation and export; `trainable` is the experts + routers part, `domains` names the experts."""
    config: ModelConfig
    moa: Optional[MoAConfig]
    params: dict
    tokenizer: Any = None
    source: str = ""
    domains: tuple = ()  # expert names (domain e <-> expert e), when known
    system_prompt: Optional[str] = None  # what system_prompt="auto" means: the run's training system prompt
    prompt_format: Optional[str] = None  # "chat" | "plain": the run's; None: chat iff the tokenizer has a template
    peft_layouts: tuple = ()  # experts imported from PEFT: each adapter's own shape (export_peft writes it back)

    @property
    def trainable(self) -> dict:
        """The experts and routers (the tree training updates, without the frozen base)."""
        return split_params(self.params)[1]

    # ---- export ---------------------------------------------------------------------------------------------
    def export_peft(self, out_dir: str, *, base: Optional[str] = None) -> list[str]:
        """One PEFT LoRA adapter per expert (named by `domains`) + the router sidecar (moa_jax/export.py), which
        records this model's tokenizer, `system_prompt` and prompt format (servable routers need them). -> the
        adapter directories. base: the base model the adapters and router.json name. None (default): the weights
        these experts were trained on, i.e. the source itself where it is a Hugging Face checkpoint (a directory,
        named by its absolute path, or a Hub id) loaded unquantised, otherwise (the embedded GGUF, a .gguf file,
        tiny-random, an int8 base) those weights as moa_jax loaded them, written to out_dir/base/ as a plain
        transformers checkpoint (export_base); a string names that base instead (e.g. an embedded model's Hub id)
        and writes none."""
        from moa_jax.export import export_base, export_peft
        from moa_jax.loading.resolve import hub_id
        from moa_jax.names import inside
        if self.moa is None:
            raise ValueError("export_peft(): this model has no experts (loaded with moa=None)")
        base_model, base_dir = self.source, None
        if base is not None:
            base_model = self.source if base == hub_id(self.source) else base
        elif self._source_is_checkpoint():
            base_model = os.path.abspath(self.source) if os.path.isdir(self.source) else self.source
        else:
            base_dir = "base"
            export_base(self.params, self.config, inside(out_dir, base_dir, "base folder"), base_source=self.source,
                        tokenizer=self.tokenizer)
        return export_peft(self.trainable, self.config, self.moa, out_dir, expert_names=self.domains or None,
                           base_model=base_model, tokenizer=self.tokenizer, system_prompt=self.system_prompt,
                           prompt_format=self.prompt_format, layouts=self.peft_layouts or None, base_dir=base_dir)

    def _source_is_checkpoint(self) -> bool:
        """The source is a Hugging Face checkpoint (a directory or a Hub id) whose weights moa_jax used as they are."""
        from moa_jax.loading.resolve import looks_like_hub_id
        if self.config.quantize != "none" or not self.source:
            return False
        if os.path.isdir(self.source):
            return os.path.isfile(os.path.join(self.source, "config.json"))
        return looks_like_hub_id(self.source) and not os.path.exists(self.source)

    def export_merged(self, expert, out_dir: str, *, dtype: Optional[str] = None) -> str:
        """Base + one expert (index or domain name) merged into a transformers-loadable checkpoint directory."""
        from moa_jax.export import export_merged
        if self.moa is None:
            raise ValueError("export_merged(): this model has no experts (loaded with moa=None)")
        if isinstance(expert, str):
            if expert not in self.domains:
                raise ValueError(f"export_merged(): no expert named {expert!r}; experts: {list(self.domains)}")
            expert = self.domains.index(expert)
        return export_merged(self.params, self.config, self.moa, int(expert), out_dir, base_source=self.source,
                             tokenizer=self.tokenizer, dtype=dtype)

    # ---- save / share -----------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str) -> str:
        """This model as a self-describing folder (moa_jax/pretrained.py): experts and routers as
        adapters.safetensors, config.json with the base model's source, the ModelConfig, MoA config, domains,
        system prompt, prompt format and PEFT layouts. `moa_jax.from_pretrained(out_dir)` rebuilds it. -> out_dir."""
        from moa_jax.pretrained import pretrained_config, write_pretrained
        if self.moa is None:
            raise ValueError("save_pretrained(): this model has no experts (loaded with moa=None); its base model "
                             f"loads with moa_jax.load_model({self.source!r})")
        return write_pretrained(out_dir, self.trainable, pretrained_config(
            self.source, self.config, self.moa, self.domains, self.system_prompt, self.prompt_format,
            self.peft_layouts))

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token=None, revision: Optional[str] = None,
                    commit_message: str = "Upload MoA model (moa_jax)"):
        """save_pretrained into a temporary folder, then create the Hub model repository `repo_id` (if needed)
        and upload the folder (huggingface_hub). -> huggingface_hub's CommitInfo. The base model is not uploaded:
        loaders fetch it from the recorded source (pass `source=` to from_pretrained where that is a local path)."""
        import tempfile
        from moa_jax.pretrained import upload_pretrained
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(os.path.join(tmp, "model"))
            return upload_pretrained(folder, repo_id, private=private, token=token, revision=revision,
                                     commit_message=commit_message)

    # ---- forward --------------------------------------------------------------------------------------------
    def logits(self, token_ids, *, attention_mask=None, prompt_mask=None, routing: str = "router",
               expert: Optional[int] = None, domain=None) -> np.ndarray:
        """token_ids [B, T] -> logits [B, T, V] (numpy f32). Routers pool over prompt_mask (default: all tokens)."""
        tokens = jnp.asarray(np.atleast_2d(np.asarray(token_ids)), jnp.int32)
        mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        pmask = mask if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
        plan = resolve(self.moa, routing)
        idx = None
        if plan.needs_experts:
            idx, _ = sequence_experts(plan, self.config, self.moa, self.params, tokens, mask, pmask, expert=expert,
                                      domain=domain, names=self.domains)
        return np.asarray(_forward_fn(self.config, self.moa, plan.mode)(self.params, tokens, mask, pmask, idx))

    def route(self, token_ids, *, attention_mask=None, prompt_mask=None) -> np.ndarray:
        """The expert the routers pick per sequence [B] from its prompt tokens, under the model's routing policy
        (MoAConfig: early exit, abstention; -1 = abstained to the base model)."""
        if self.moa is None:
            raise ValueError("route(): this model has no experts (loaded with moa=None)")
        tokens = jnp.asarray(np.atleast_2d(np.asarray(token_ids)), jnp.int32)
        mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        idx, _ = route_from_prompt(self.config, self.moa, self.params, tokens, mask, prompt_mask, names=self.domains)
        return np.asarray(idx)

    # ---- generation -----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, system_prompt: Optional[str] = "auto") -> list[int]:
        """A user message (str) or a chat `messages` list -> token ids in the model's prompt format (chat: with the
        template's generation cue), formatted as training formats prompts (a system turn in `messages` wins over
        `system_prompt`)."""
        from moa_jax.data.prompt_format import conversation, prompt_ids, resolve_prompt_format
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        system = self.system_prompt if system_prompt == "auto" else system_prompt
        fmt = resolve_prompt_format(self.prompt_format or "auto", self.tokenizer)
        return list(prompt_ids(self.tokenizer, [conversation({"messages": messages}, system)], fmt)[0])

    def generate(self, prompts: Sequence, *, max_new_tokens: int = 64, routing: str = "router",
                 expert: Optional[int] = None, domain=None, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, system_prompt: Optional[str] = "auto") -> list[Generation]:
        """Batched generation; each prompt is routed once and keeps its expert for every token. Prompts are
        strings, `messages` lists or token-id lists; system_prompt as in encode_prompt ("auto": the run's).
        Greedy by default; temperature > 0 samples, optionally from the top_k best tokens and/or the nucleus of
        probability top_p (0 / 1.0: off; moa_jax/generate/sampling.py), reproducibly for a given seed."""
        tokens, mask, eos = self._prompt_batch("generate", prompts, system_prompt)
        out, idx, _ = generate_tokens(self.config, self.moa, self.params, tokens, mask, routing=routing,
                                      expert=expert, domain=domain, max_new_tokens=max_new_tokens,
                                      eos_ids=eos, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                      names=self.domains)
        results = []
        for row, e in zip(out, idx):
            ids = until_eos(row, eos)
            results.append(Generation(self.tokenizer.decode(ids, skip_special_tokens=True), int(e), tuple(ids)))
        return results

    def generate_stream(self, prompt, *, max_new_tokens: int = 64, routing: str = "router",
                        expert: Optional[int] = None, domain=None, temperature: float = 0.0, top_k: int = 0,
                        top_p: float = 1.0, seed: int = 0,
                        system_prompt: Optional[str] = "auto") -> Iterator[TextPiece]:
        """One prompt's answer as it is decoded: TextPieces (text, expert, token_ids) whose texts concatenate to
        generate([prompt], same arguments)[0].text; the arguments are generate's (domain: the prompt's label).
        The same decoding program, streamed (moa_jax/generate/stream.py); leaving the loop early stops it."""
        tokens, mask, eos = self._prompt_batch("generate_stream", [prompt], system_prompt)
        domain = None if domain is None else [domain] if np.ndim(domain) == 0 else domain
        check_sampling(temperature, top_k, top_p)     # here, not first inside the decoding thread

        def run(on_token):
            generate_tokens(self.config, self.moa, self.params, tokens, mask, routing=routing, expert=expert,
                            domain=domain, max_new_tokens=max_new_tokens, eos_ids=eos, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, names=self.domains, on_token=on_token)
        return stream_text(run, self.tokenizer, eos)

    def _prompt_batch(self, caller: str, prompts: Sequence, system_prompt) -> tuple[np.ndarray, np.ndarray, tuple]:
        """Prompts -> (left-padded tokens [B, T], attention mask [B, T], the EOS ids)."""
        if self.tokenizer is None:
            raise ValueError(f"{caller}(): {self.source!r} has no tokenizer files (tokenizer.json, or tokenizer.model "
                             f"+ tokenizer_config.json), so prompts cannot be encoded or answers decoded; copy the "
                             f"base model's tokenizer files there, or use moa_jax.generate.decode.generate_tokens "
                             f"with token ids")
        seqs = [p if _is_token_list(p) else self.encode_prompt(p, system_prompt) for p in prompts]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return (*left_pad(seqs, pad), eos_ids(self.tokenizer))


def _is_token_list(p) -> bool:
    return isinstance(p, (list, tuple, np.ndarray)) and len(p) > 0 and isinstance(p[0], (int, np.integer))


@functools.lru_cache(maxsize=None)
def _forward_fn(cfg: ModelConfig, moa: Optional[MoAConfig], mode: str):
    model = MoATransformer(cfg, moa)

    @jax.jit
    def forward(params, tokens, mask, pmask, idx):
        return entry.forward(model, params, entry.ModelInputs(tokens, mask, pmask), mode=mode, expert_idx=idx)[0]
    return forward


def _load_frozen(source: str, dtype: Optional[str], param_dtype: Optional[str], quantize: Optional[str]):
    """-> (ModelConfig with the compute/storage dtypes, frozen params on device, tokenizer). dtype defaults to
    float32 on CPU and bfloat16 on accelerators; param_dtype to dtype; quantize: None/"none" or "int8"."""
    quantize = check_quantize(quantize)
    dtype = default_dtype(dtype)
    # each leaf goes to the device as soon as it is built, so the host holds at most one leaf of the base
    cfg, frozen, tokenizer = load_base_model(source, param_dtype or dtype, quantize,
                                             place=lambda path, leaf: jax.block_until_ready(jnp.asarray(leaf)))
    return replace(cfg, dtype=dtype, param_dtype=param_dtype or dtype), frozen, tokenizer


def load_model(source: str = "smollm2-135m-instruct", *, moa: Optional[MoAConfig] = None,
               dtype: Optional[str] = None, param_dtype: Optional[str] = None, adapters: Optional[str] = None,
               seed: int = 0, quantize: Optional[str] = None) -> MoAModel:
    """Load a base model (+ fresh or trained MoA experts). dtype: compute dtype (default float32 on CPU,
    bfloat16 on accelerators); param_dtype: storage of the frozen base (default = dtype); quantize="int8":
    the frozen projection kernels as int8 with per-output-channel scales (moa_jax/nn/quantize.py).
    adapters=DIR (`<workdir>/<stage>/adapters`): trained experts and routers with the MoA config recorded beside
    them; a `moa` given too must agree with it on every field that changes the function (the MoAConfig
    fields marked "function": experts, rank, alpha, rsLoRA, targets, dispatch, router; it may change `decision`)."""
    trained = _read_adapters(os.fspath(adapters), moa) if adapters is not None else None
    cfg, frozen, tokenizer = _load_frozen(source, dtype, param_dtype, quantize)
    attached = trained[2] if trained is not None else moa   # the MoA config the experts will have
    if attached is not None:
        check_rank_fits(cfg, attached)
    if trained is not None:
        return _with_adapters(cfg, frozen, tokenizer, source, os.fspath(adapters), *trained)
    if moa is None:
        return MoAModel(cfg, None, frozen, tokenizer, source)
    trainable = init_trainable(cfg, moa, jax.random.PRNGKey(seed))
    return MoAModel(cfg, moa, merge_params(frozen, trainable), tokenizer, source)


class AdapterConfigError(UserError, ValueError):
    """load_model(adapters=...) without a usable MoA config, or with one the adapters were not trained with."""


def _read_adapters(adapters: str, moa: Optional[MoAConfig]) -> tuple[dict, dict, MoAConfig]:
    """-> (trainable tree, the artifact's config, the MoA config to use), checked before the base model loads."""
    from moa_jax.train.checkpoint import config_mismatches, load_adapters  # orbax: deferred
    check_adapter_dir(adapters, "point at the adapters/ folder of a finished stage (<workdir>/<stage>/adapters)")
    trainable, saved = load_adapters(adapters)
    recorded = adapter_moa(saved, adapters)
    if recorded is None and moa is None:
        raise AdapterConfigError(f"{adapters}/config.json records no MoA config: pass the one the adapters were "
                                 f"trained with as load_model(..., moa=MoAConfig(...))")
    if recorded is not None and moa is not None:
        diff = config_mismatches(saved, {"moa": json.loads(json.dumps(dataclasses.asdict(moa)))},
                                 tuple(k for k in stage_keys("function") if k.startswith("moa.")))
        if diff:
            raise AdapterConfigError(
                f"{adapters}: moa= differs from the MoA config these adapters were trained with ("
                + ", ".join(f"{k[4:]}={b!r} given, {a!r} trained" for k, a, b in diff)
                + "); leave out moa= to use the recorded one")
    return trainable, saved, moa or recorded


def _with_adapters(cfg: ModelConfig, frozen, tokenizer, source: str, adapters: str, trainable: dict, saved: dict,
                   moa: MoAConfig) -> MoAModel:
    from moa_jax.train.checkpoint import CheckpointMismatchError, config_mismatches
    diff = config_mismatches(saved, {"model": dataclasses.asdict(cfg)}, stage_keys("shape"))
    if diff:
        raise CheckpointMismatchError(f"{adapters}: trained on a base model with "
                                      + ", ".join(f"{k}={a!r}" for k, a, _ in diff)
                                      + f", but {source!r} has " + ", ".join(f"{k}={b!r}" for k, _, b in diff)
                                      + f"; load the base model {saved['model'].get('source')!r}")
    check_tree(split_params(param_shapes(cfg, moa))[1], trainable, adapters)
    params = merge_params(frozen, jax.tree_util.tree_map(jnp.asarray, trainable))
    return MoAModel(cfg, moa, params, tokenizer, source, domains=expert_names(saved, moa.num_experts),
                    system_prompt=training_system_prompt(saved.get("data")),
                    prompt_format=training_prompt_format(saved.get("data")))


def load_run(workdir: str, stage: Optional[str] = None, *, source: Optional[str] = None, dtype: Optional[str] = None,
             quantize: Optional[str] = None, best: bool = False) -> MoAModel:
    """A finished run's model, ready to `.generate()`: the base model the run trained on (or `source=` where it
    moved), the `stage`'s experts and routers with their MoA config, the domain names as `.domains` and the
    training system prompt and prompt format as `.system_prompt` and `.prompt_format` (generate's). Stages: the
    run's final model by default (stage2 for the two_stage and capacity workflows, refit for add_domain), stage1,
    mixed_lora, moe_lora, variants/NAME/stage2 (moa_jax/run_artifacts.py). dtype / quantize default to the run's.
    Stage 2 routes with the policy the run settled on after training (<workdir>/routing.json: early exit,
    temperature, abstention threshold and fall-back, moa_jax/eval/calibration.py), when the run wrote one.
    best=True: the stage's adapters of lowest validation loss (<stage>/best_adapters, kept when it trained with
    eval_every) instead of its final ones."""
    run = read_run(workdir, stage, source, best=best)
    model = load_model(run.source, adapters=run.adapters, dtype=dtype or run.dtype,
                       quantize=quantize or run.quantize)
    moa = model.moa
    if run.stage == "stage2" and moa is not None:   # the routing policy picked on validation (routing.json)
        moa = applied_routing_policy(workdir, moa)
    return dataclasses.replace(model, moa=moa, domains=run.domains, system_prompt=run.system_prompt,
                               prompt_format=run.prompt_format)


def from_peft(source: str, adapter_dirs: Sequence[str], *, names: Optional[Sequence[str]] = None,
              moa: Optional[MoAConfig] = None, dtype: Optional[str] = None, param_dtype: Optional[str] = None,
              seed: int = 0, quantize: Optional[str] = None) -> MoAModel:
    """An MoA model whose experts are existing PEFT LoRA adapters (expert e = adapter_dirs[e], named by `names`
    or each directory's base name) on the base model `source`; the routers start fresh (train them with
    stage 2, e.g. `--set stage1.init_from_peft=DIR,DIR`). Rank/scale handling: moa_jax/peft_import.py.
    quantize="int8": the base as in load_model (QLoRA-style: int8 base, full-precision experts)."""
    cfg, frozen, tokenizer = _load_frozen(source, dtype, param_dtype, quantize)
    experts = read_peft_experts(adapter_dirs, cfg, names=names, moa=moa)
    trainable = traverse_util.flatten_dict(jax.device_get(init_trainable(cfg, experts.moa, jax.random.PRNGKey(seed))))
    trainable.update(experts.lora)
    params = merge_params(frozen, jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(trainable)))
    return MoAModel(cfg, experts.moa, params, tokenizer, source, domains=experts.names,
                    peft_layouts=experts.layouts)


def from_pretrained(path: str, *, source: Optional[str] = None, dtype: Optional[str] = None,
                    quantize: Optional[str] = None) -> MoAModel:
    """The model `MoAModel.save_pretrained` wrote to `path` (a folder, or a Hub repository id ORG/NAME[@REVISION]
    that push_to_hub uploaded): the base model from the recorded source (or `source=` where it is now) in the
    recorded dtypes and storage (or dtype= / quantize=), the experts and routers, domains, system prompt, prompt
    format and PEFT layouts as saved."""
    from moa_jax.pretrained import read_pretrained
    info = read_pretrained(path)
    recorded = info.model
    model = load_model(source or info.source, adapters=info.directory, dtype=dtype or recorded.get("dtype"),
                       param_dtype=None if dtype else recorded.get("param_dtype"),
                       quantize=quantize or recorded.get("quantize"))
    config = replace(model.config, **{k: recorded[k] for k in ("remat", "loss_chunk") if k in recorded})
    return dataclasses.replace(model, config=config, domains=info.domains, system_prompt=info.system_prompt,
                               prompt_format=info.prompt_format, peft_layouts=info.layouts)

