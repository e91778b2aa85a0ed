"""Ship trained experts: each expert as a Hugging Face PEFT LoRA adapter, plus a router sidecar.

    export_peft(trainable, model_cfg, moa, out_dir, expert_names=[...], base_model="...")
      out_dir/<name>/adapter_config.json + adapter_model.safetensors     (one PEFT adapter per expert)
      out_dir/router.safetensors + router.json                           (router weights [L, D, E], names, policy)

A server then loads the base model once, every expert with `PeftModel.load_adapter(dir, adapter_name=name)`, and
routes each request with the router sidecar (or uses `adapter_names=` for mixed batches). Tensors are converted
from our layout (lora_a [L, E, Din, R], lora_b [L, E, R, Dout]) to PEFT's torch Linear layout
(lora_A.weight [R, Din], lora_B.weight [Dout, R]); scaling = lora_alpha / r in PEFT equals our scale.

Shape glossary: L layers, E experts, D width, Din/Dout projection widths, R rank.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
from flax import traverse_util

from moa_jax.config import ATTENTION_PROJECTIONS, ModelConfig, MoAConfig
from moa_jax.loading.resolve import hub_id

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


def adapter_config(moa: MoAConfig, base_model: str) -> dict:
    """PEFT's adapter_config.json; an embedded model's name (e.g. smollm2-135m-instruct) becomes its Hub id."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": hub_id(base_model),
            "r": moa.rank, "lora_alpha": moa.alpha, "lora_dropout": moa.dropout, "use_rslora": moa.use_rslora,
            "target_modules": list(moa.targets), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True}


def export_peft(trainable: dict, cfg: ModelConfig, moa: MoAConfig, out_dir: str,
                expert_names: Optional[Sequence[str]] = None, base_model: str = "") -> list[str]:
    """Write one PEFT adapter directory per expert and the router sidecar. -> the adapter directories."""
    from safetensors.numpy import save_file
    names = list(expert_names or [f"expert_{e}" for e in range(moa.num_experts)])
    if len(names) != moa.num_experts:
        raise ValueError(f"expert_names has {len(names)} names for {moa.num_experts} experts")
    os.makedirs(out_dir, exist_ok=True)
    dirs = []
    for e, name in enumerate(names):
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        save_file(peft_state_dict(trainable, cfg, moa, e), os.path.join(d, "adapter_model.safetensors"))
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(adapter_config(moa, base_model), f, indent=1)
        dirs.append(d)
    router = traverse_util.flatten_dict(trainable)
    router = {"/".join(k[2:]): np.asarray(v, np.float32) for k, v in router.items() if k[:2] == ("layers", "router")}
    save_file(router, os.path.join(out_dir, "router.safetensors"))
    with open(os.path.join(out_dir, "router.json"), "w") as f:
        json.dump({"experts": names, "router_type": moa.router_type, "decision": moa.decision,
                   "pooling": "mean of each layer's input RMSNorm output over prompt tokens",
                   "tensors": {k: list(v.shape) for k, v in router.items()}}, f, indent=1)
    return dirs
