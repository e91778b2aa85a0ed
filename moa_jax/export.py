"""Ship trained experts: each expert as a Hugging Face PEFT LoRA adapter plus a router sidecar, or one expert
merged into the base weights as a plain transformers checkpoint.

    export_peft(trainable, model_cfg, moa, out_dir, expert_names=[...], base_model="...", layouts=None,
                base_dir=None)
      out_dir/<name>/adapter_config.json + adapter_model.safetensors     (one PEFT adapter per expert)
      out_dir/router.safetensors + router.json                           (router weights [L, D, E] and how to route)
      out_dir/tokenizer/ + reference_router.py + route_serve.py          (servable export: moa.route_on='probe')
    export_base(params, model_cfg, out_dir/base, base_source=..., tokenizer=...)
      the trained base alone as a transformers checkpoint; export_peft(..., base_dir="base") then names it
    export_merged(params, model_cfg, moa, expert, out_dir, base_source=..., tokenizer=...)
      out_dir/config.json + model.safetensors (or shards + index) + tokenizer files   (W + scale * A[e] B[e])

A server then loads the base model once, every expert with `PeftModel.load_adapter(dir, adapter_name=name)`, and
routes each request with the router sidecar (or uses `adapter_names=` for mixed batches). Routers trained with
MoAConfig.route_on='probe' are servable: one forward of the plain base model over the prompt picks the adapter;
router.json records everything that takes (moa_jax/export_router.py) and moa_jax/reference_router.py, copied into
the export, does it with transformers + torch only. Routers of route_on='adapted' (the paper's routing pass, each
layer routed by its own router on the adapted model) are exported with `"servable": false`. The experts hold
deltas for the base weights they were trained on, so an export names that base: `base_dir`, the folder export_base
wrote inside it (what MoAModel.export_peft does for a GGUF, int8 or built base), else `base_model`; naming the
full-precision Hub id of an embedded Q4_1 GGUF instead gives a server slightly different weights, whose routing and
outputs can differ from moa_jax's (check with the reference router on your prompts). Tensors are converted
from our layout (lora_a [L, E, Din, R], lora_b [L, E, R, Dout]) to PEFT's torch Linear layout
(lora_A.weight [R, Din], lora_B.weight [Dout, R]); scaling = lora_alpha / r in PEFT equals our scale. Every
expert is written at the MoAConfig's rank on its targets, except experts imported from PEFT adapters
(moa_jax/peft_import.py `ExpertLayout`, `layouts=`): each is written back in its own adapter's shape (its ranks,
projections, layers, adapter_config.json and dtype), as long as the tree holds nothing outside that shape.
Expert names follow moa_jax/names.py and every file is placed with `names.inside`: nothing is written outside
out_dir, whatever the names.

Shape glossary: L layers, E experts, D width, Din/Dout projection widths, R rank.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np
from flax import traverse_util

from moa_jax.config import ATTENTION_PROJECTIONS, ModelConfig, MoAConfig
from moa_jax.loading.hf import family_config_json, hf_key
from moa_jax.loading.resolve import HF, hub_id, resolve_source
from moa_jax.loading.tree import expected_shapes, numpy_dtype
from moa_jax.nn.quantize import SCALE_LEAF, dequantize
from moa_jax.export_router import NOT_GIVEN, write_router_sidecar
from moa_jax.names import check_name, inside
from moa_jax.peft_import import ExpertLayout

log = logging.getLogger("moa_jax")

_MODULE_PREFIX = {p: "self_attn" for p in ATTENTION_PROJECTIONS} | {"gate_proj": "mlp", "up_proj": "mlp",
                                                                      "down_proj": "mlp"}
_GROUP = {"self_attn": "attn", "mlp": "mlp"}


def peft_state_dict(trainable: dict, cfg: ModelConfig, moa: MoAConfig, expert: int) -> dict[str, np.ndarray]:
    """One expert's tensors under PEFT's key names."""
    if not 0 <= expert < moa.num_experts:
        raise ValueError(f"expert {expert} not in [0, {moa.num_experts})")
    flat = traverse_util.flatten_dict(trainable)
    out = {}
    for proj in moa.targets:
        module = _MODULE_PREFIX[proj]
        a = np.asarray(flat[("layers", _GROUP[module], proj, "lora_a")], np.float32)   # (L, E, Din, R)
        b = np.asarray(flat[("layers", _GROUP[module], proj, "lora_b")], np.float32)   # (L, E, R, Dout)
        for layer in range(cfg.num_layers):
            key = f"base_model.model.model.layers.{layer}.{module}.{proj}"
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[layer, expert].T)       # (R, Din)
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[layer, expert].T)       # (Dout, R)
    return out


def layout_state_dict(trainable: dict, moa: MoAConfig, expert: int,
                      layout: ExpertLayout) -> Optional[dict[str, np.ndarray]]:
    """One imported expert's tensors in its own PEFT adapter's shape (only its modules, each at its own rank,
    lora_B divided by the scale ratio the import multiplied it by, in the adapter's dtype); None when the tree holds
    weights outside that shape (the expert changed after import)."""
    flat = traverse_util.flatten_dict(trainable)
    ranks = {(layer, proj): r for layer, proj, r in layout.modules}
    if any(proj not in moa.targets for _, proj in ranks):
        return None
    dtype = numpy_dtype(layout.dtype)
    out = {}
    for proj in moa.targets:
        module = _MODULE_PREFIX[proj]
        a = np.asarray(flat[("layers", _GROUP[module], proj, "lora_a")][:, expert], np.float32)   # (L, Din, R)
        b = np.asarray(flat[("layers", _GROUP[module], proj, "lora_b")][:, expert], np.float32)   # (L, R, Dout)
        for layer in range(a.shape[0]):
            r = ranks.get((layer, proj), 0)
            if a[layer, :, r:].any() or b[layer, r:].any():
                return None
            if r == 0:
                continue
            ratio = layout.scale_ratio(r, moa)
            b_r = b[layer, :r] if ratio == 1.0 else b[layer, :r] / np.float32(ratio)   # (r, Dout)
            key = f"base_model.model.model.layers.{layer}.{module}.{proj}"
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[layer, :, :r].T).astype(dtype)   # (r, Din)
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b_r.T).astype(dtype)               # (Dout, r)
    return out


def adapter_config(moa: MoAConfig, base_model: str) -> dict:
    """PEFT's adapter_config.json; an embedded model's name (e.g. smollm2-135m-instruct) becomes its Hub id."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": hub_id(base_model),
            "r": moa.rank, "lora_alpha": moa.alpha, "lora_dropout": moa.dropout, "use_rslora": moa.use_rslora,
            "target_modules": list(moa.targets), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True}


def export_peft(trainable: dict, cfg: ModelConfig, moa: MoAConfig, out_dir: str,
                expert_names: Optional[Sequence[str]] = None, base_model: str = "", *, tokenizer=None,
                system_prompt: Any = NOT_GIVEN, prompt_format: Optional[str] = None,
                layouts: Optional[Sequence[ExpertLayout]] = None, base_dir: Optional[str] = None) -> list[str]:
    """Write one PEFT adapter directory per expert and the router sidecar (moa_jax/export_router.py). -> the adapter
    directories. tokenizer: the one training used (its chat template is recorded and it is saved to tokenizer/);
    system_prompt: the system message training added to every prompt (None: none). A servable export
    (moa.route_on='probe') needs both, since routing reads the formatted prompt. prompt_format: the run's "chat" |
    "plain" (moa_jax/data/prompt_format.py; None: chat iff the tokenizer has a chat template). layouts: one
    ExpertLayout per expert for experts imported from PEFT (written back in their own shape, layout_state_dict).
    base_dir: a folder inside out_dir that holds the base the experts were trained on (export_base writes it): every
    adapter_config.json names its absolute path as base_model_name_or_path (so PEFT loads it offline; pass the base
    explicitly once the export moves), router.json names it relative to the export (reference_router.base_of);
    base_model then only records where that base came from."""
    from safetensors.numpy import save_file
    names = list(expert_names or [f"expert_{e}" for e in range(moa.num_experts)])
    if len(names) != moa.num_experts:
        raise ValueError(f"expert_names has {len(names)} names for {moa.num_experts} experts")
    if layouts and len(layouts) != moa.num_experts:
        raise ValueError(f"layouts has {len(layouts)} entries for {moa.num_experts} experts")
    for name in names:   # before anything is written: a name from the data must not become a path
        check_name(name, "export_peft: expert name")
    if base_dir in names or "tokenizer" in names:
        raise ValueError(f"export_peft: an expert named {base_dir if base_dir in names else 'tokenizer'!r} would "
                         f"share its folder with the export's {base_dir if base_dir in names else 'tokenizer'}/")
    os.makedirs(out_dir, exist_ok=True)
    named_base = os.path.abspath(inside(out_dir, base_dir, "base folder")) if base_dir else base_model
    dirs = []
    for e, name in enumerate(names):
        d = inside(out_dir, name, "expert folder")
        os.makedirs(d, exist_ok=True)
        own = layout_state_dict(trainable, moa, e, layouts[e]) if layouts else None
        if layouts and own is None:
            log.warning("export_peft: expert %s holds weights outside the PEFT adapter it was imported from; "
                        "exported at rank %d on %s", name, moa.rank, list(moa.targets))
        save_file(own if own is not None else peft_state_dict(trainable, cfg, moa, e),
                  inside(d, "adapter_model.safetensors"))
        config = layouts[e].config if own is not None else adapter_config(moa, named_base)
        if own is not None and base_dir:
            config = {**config, "base_model_name_or_path": named_base}
        with open(inside(d, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=1)
        dirs.append(d)
    router = traverse_util.flatten_dict(trainable)
    router = {"/".join(k[2:]): np.asarray(v, np.float32) for k, v in router.items() if k[:2] == ("layers", "router")}
    save_file(router, inside(out_dir, "router.safetensors"))
    write_router_sidecar(out_dir, router, cfg, moa, names, base_model, tokenizer, system_prompt, prompt_format,
                         base_dir)
    return dirs


# ---- merged export: base + one expert as a plain transformers checkpoint ------------------------------------------
SHARD_BYTES = 2 << 30   # tensors per safetensors shard; also bounds the host memory the export needs
_MERGED_DTYPES = ("float32", "float16", "bfloat16")   # what export_merged writes


def hf_config_dict(cfg: ModelConfig, tokenizer=None, dtype: str = "float32") -> dict:
    """A transformers config.json for a ModelConfig (used when the base came from a GGUF file or was built here)."""
    family = family_config_json(cfg)   # Qwen3 / Gemma 3: their own fields
    if family is not None:
        return {**family, "dtype": dtype, **_special_token_ids(tokenizer)}
    model_type = cfg.name if cfg.name in ("llama", "mistral", "qwen2") else "llama"
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_theta": cfg.rope_theta, "rope_type": rs.rope_type, "factor": rs.factor}
        if rs.rope_type == "llama3":
            rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                        original_max_position_embeddings=rs.original_max_position_embeddings)
    out = {"architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                              "qwen2": "Qwen2ForCausalLM"}[model_type]],
           "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
           "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
           "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
           "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
           "rope_parameters": rope, "rope_theta": cfg.rope_theta, "dtype": dtype}
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if cfg.sliding_window is not None:
        out.update(sliding_window=cfg.sliding_window, use_sliding_window=True)
    return {**out, **_special_token_ids(tokenizer)}


def _special_token_ids(tokenizer) -> dict:
    names = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {n: int(getattr(tokenizer, n)) for n in names if getattr(tokenizer, n, None) is not None}


def merged_plan(cfg: ModelConfig) -> list[tuple[tuple, Optional[int], str, tuple]]:
    """Every tensor of the merged checkpoint in write order: (tree path, layer or None, HF key, HF shape)."""
    plan = []
    for path, shape in expected_shapes(dataclasses.replace(cfg, quantize="none")).items():
        stacked = path[0] == "layers"
        leaf_shape = shape[1:] if stacked else shape
        hf_shape = leaf_shape[::-1] if path[-1] == "kernel" else leaf_shape   # torch Linear: [Dout, Din]
        for layer in range(cfg.num_layers) if stacked else [None]:
            plan.append((path, layer, hf_key(path, layer), tuple(hf_shape)))
    return plan


def merged_tensor(flat: dict, moa: Optional[MoAConfig], expert: Optional[int], path: tuple,
                  layer: Optional[int]) -> np.ndarray:
    """One tensor of base + scale * A[expert] B[expert] (expert None: the base alone), float32, in the Hugging Face
    layout."""
    w = np.asarray(flat[path] if layer is None else flat[path][layer], np.float32)
    if path[-1] != "kernel":
        return w
    scale = flat.get(path[:-1] + (SCALE_LEAF,))
    if scale is not None:   # an int8 base: the merged checkpoint holds its dequantised values
        w = dequantize(w, np.asarray(scale[layer], np.float32), np.float32)
    if expert is not None and path[0] == "layers" and path[2] in moa.targets:
        a = np.asarray(flat[path[:-1] + ("lora_a",)][layer, expert], np.float32)    # (Din, R)
        b = np.asarray(flat[path[:-1] + ("lora_b",)][layer, expert], np.float32)    # (R, Dout)
        w = w + np.float32(moa.scale) * (a @ b)                                      # (Din, Dout)
    return w.T


def _shard_plan(plan, itemsize: int) -> list[list]:
    """Consecutive groups of plan entries of at most SHARD_BYTES each (a bigger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for entry in plan:
        nbytes = int(np.prod(entry[3])) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def export_merged(params: dict, cfg: ModelConfig, moa: MoAConfig, expert: int, out_dir: str, *,
                  base_source: str = "", tokenizer=None, dtype: Optional[str] = None) -> str:
    """Write base + expert `expert` merged into a transformers-loadable checkpoint (config.json, safetensors
    shards of at most SHARD_BYTES with an index when there are several, tokenizer files): a single-domain
    deployment at the cost of the base model. One shard is held in host memory at a time. A Hugging Face
    `base_source` directory's config.json is kept (its dtype set to the written one); otherwise (GGUF, built
    models) config.json is written from the ModelConfig. dtype: of the written weights (default: the base's;
    an int8 base is written dequantised, in float32 unless dtype says otherwise). -> out_dir."""
    if not 0 <= expert < moa.num_experts:
        raise ValueError(f"expert {expert} not in [0, {moa.num_experts})")
    return _write_checkpoint(params, cfg, moa, expert, out_dir, base_source, tokenizer, dtype)


def export_base(params: dict, cfg: ModelConfig, out_dir: str, *, base_source: str = "", tokenizer=None,
                dtype: Optional[str] = None) -> str:
    """Write the frozen base alone (the weights moa_jax loaded: a GGUF or int8 base dequantised) as a plain
    transformers checkpoint, laid out as export_merged's; the experts and routers in `params`, if any, are left
    out. export_peft's adapters and router.json can name it as their base (base_dir). -> out_dir."""
    return _write_checkpoint(params, cfg, None, None, out_dir, base_source, tokenizer, dtype)


def _write_checkpoint(params: dict, cfg: ModelConfig, moa: Optional[MoAConfig], expert: Optional[int], out_dir: str,
                      base_source: str, tokenizer, dtype: Optional[str]) -> str:
    """export_merged (expert set) and export_base (expert None)."""
    dtype = dtype or (cfg.param_dtype if cfg.quantize == "none" else "float32")
    if dtype not in _MERGED_DTYPES:
        raise ValueError(f"dtype={dtype!r} not in {list(_MERGED_DTYPES)}")
    from safetensors.numpy import save_file
    np_dtype = numpy_dtype(dtype)
    flat = traverse_util.flatten_dict(params)
    shards = _shard_plan(merged_plan(cfg), np_dtype.itemsize)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    os.makedirs(out_dir, exist_ok=True)
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        # contiguous: save_file writes each array's buffer as it lies in memory (bfloat16 included)
        tensors = {key: np.ascontiguousarray(merged_tensor(flat, moa, expert, path, layer).astype(np_dtype))
                   for path, layer, key, _ in shard}
        save_file(tensors, inside(out_dir, name))
        weight_map.update({key: name for key in tensors})
        total += sum(a.nbytes for a in tensors.values())
    if len(shards) > 1:
        with open(inside(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    hf_config = None
    if base_source:
        try:
            kind, path = resolve_source(base_source)
        except (FileNotFoundError, ValueError):
            kind = None
        if kind == HF:
            with open(os.path.join(path, "config.json")) as f:
                hf_config = json.load(f)
            hf_config.pop("torch_dtype", None)
            hf_config["dtype"] = dtype
    with open(inside(out_dir, "config.json"), "w") as f:
        json.dump(hf_config or hf_config_dict(cfg, tokenizer, dtype), f, indent=1)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
