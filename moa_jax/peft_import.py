"""Existing Hugging Face PEFT LoRA adapters as MoA experts (the inverse of `moa_jax.export.export_peft`).

    experts = read_peft_experts(["/adapters/math", "/adapters/code"], cfg)
    experts.moa, experts.names          # the MoAConfig that holds them, and one name per expert
    experts.lora                        # {("layers", "attn"|"mlp", proj, "lora_a"|"lora_b"): array}
    experts.layouts                     # per expert: the (layer, projection, rank) it adapts and its config

Each directory is what `PeftModel.save_pretrained` writes: `adapter_config.json` + `adapter_model.safetensors`
(pickled `adapter_model.bin` files are refused, never unpickled). Tensors are mapped from PEFT's torch Linear
layout (`...layers.{l}.{self_attn|mlp}.{proj}.lora_A.weight` [R, Din], `lora_B.weight` [Dout, R]) to our stacked
layout (lora_a [L, E, Din, R], lora_b [L, E, R, Dout]).

Ranks and scales. Adapters may differ in rank, alpha, rsLoRA, targets and the layers they adapt. A LoRA delta
scale * (x A) B is unchanged when A gets zero columns and B zero rows, so every expert is zero-padded to the
largest rank; a projection or layer an adapter does not adapt gets zeros (delta 0, as in PEFT). The MoA model has
one scale for all experts: when every adapter has the same rank, alpha and rsLoRA setting, that is the MoAConfig's
(and an export -> import -> export round trip is bit-identical); otherwise the MoAConfig gets alpha = rank
(scale 1) and each expert's B carries its own PEFT scale (lora_alpha / r, or / sqrt(r) with rsLoRA; the rank
per module is read from the tensors, so `rank_pattern` is honoured). Anything PEFT's LoRA can express that a
plain delta x A B cannot (DoRA, LoRA biases, `alpha_pattern`, `modules_to_save`, adapted embeddings or heads) is
refused with the file and the key.

Each expert keeps its adapter's own shape as an ExpertLayout (the rank of every (layer, projection) it adapts, its
adapter_config.json and tensor dtype), so `export_peft` writes it back as it came rather than padded to the
shared rank on the shared targets: bit-identical when the expert's scale ratio is 1 or a power of two (the same
rank, alpha and rsLoRA for all adapters, or PEFT's usual alpha = 2r); with another ratio lora_B comes back within
float32 rounding of the original (B is multiplied by the ratio on import and divided by it on export).

Shape glossary: L layers, E experts, Din/Dout projection widths, R rank.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional, Sequence

import numpy as np

from moa_jax.config import DTYPES, PROJECTIONS, ModelConfig, MoAConfig
from moa_jax.loading.resolve import CheckpointError
from moa_jax.loading.tree import numpy_dtype
from moa_jax.names import check_name

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
GROUP = {"self_attn": "attn", "mlp": "mlp"}
MODULE_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# PEFT's saved keys: [base_model.model.]model.layers.{l}.{self_attn|mlp}.{proj}.lora_{A|B}[.{adapter}].weight
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                  r"(?:\.[\w-]+)?\.weight$")
# adapter_config.json entries whose non-default values a plain delta x A B cannot reproduce.
_UNSUPPORTED = {"use_dora": False, "alpha_pattern": {}, "modules_to_save": None, "fan_in_fan_out": False,
                "bias": "none", "lora_bias": False, "use_qalora": False, "trainable_token_indices": None,
                "layer_replication": None, "target_parameters": None, "alora_invocation_tokens": None,
                "use_bdlora": False}


class PeftImportError(CheckpointError):
    """A PEFT adapter directory cannot become an MoA expert; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
    """One adapter directory as read: its config and its per-(layer, projection) A [R, Din] and B [Dout, R]."""
    path: str
    config: dict
    tensors: dict        # (layer, proj) -> (A [R, Din], B [Dout, R]) as float32 numpy
    dtype: str = "float32"   # the tensors' dtype in the file

    def scale(self, rank: int) -> float:
        return peft_scale(self.config, rank)

    @property
    def ranks(self) -> set[int]:
        return {a.shape[0] for a, _ in self.tensors.values()}


def peft_scale(config: dict, rank: int) -> float:
    """PEFT's LoRA scaling of a module of `rank` under adapter_config.json `config`: lora_alpha / r (/ sqrt(r))."""
    alpha = float(config.get("lora_alpha", 8))
    return alpha / (rank ** 0.5 if config.get("use_rslora", False) else rank)


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """One imported adapter's own shape: the (layer, projection, rank) of each module it adapts, sorted, its
    adapter_config.json and its tensors' dtype. export_peft writes the expert back in this shape."""
    modules: tuple       # ((layer, proj, rank), ...)
    config: dict
    dtype: str = "float32"

    def scale_ratio(self, rank: int, moa: MoAConfig) -> float:
        """The factor lora_b carries on import (exactly 1.0 when the MoAConfig took this adapter's scale)."""
        return peft_scale(self.config, rank) / moa.scale

    def to_json(self) -> dict:
        return {"modules": [list(m) for m in self.modules], "config": self.config, "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "ExpertLayout":
        return cls(tuple((int(layer), str(proj), int(rank)) for layer, proj, rank in d["modules"]),
                   dict(d["config"]), str(d.get("dtype", "float32")))


def expert_layout(adapter: PeftAdapter) -> ExpertLayout:
    return ExpertLayout(tuple((layer, proj, a.shape[0]) for (layer, proj), (a, _) in sorted(adapter.tensors.items())),
                        adapter.config, adapter.dtype)


@dataclasses.dataclass(frozen=True)
class PeftExperts:
    """The imported experts: MoAConfig, one name per expert, and the lora_a / lora_b leaves of the trainable tree."""
    moa: MoAConfig
    names: tuple[str, ...]
    lora: dict           # ("layers", group, proj, "lora_a"|"lora_b") -> numpy [L, E, Din, R] | [L, E, R, Dout]
    base_model: str      # base_model_name_or_path of the first adapter
    layouts: tuple = ()  # one ExpertLayout per expert


def read_peft_adapter(path: str, cfg: ModelConfig) -> PeftAdapter:
    """Reads and checks one PEFT LoRA directory against the base model's shapes."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    config_file, weights_file = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    if not os.path.isdir(path):
        raise PeftImportError(f"PEFT adapter {path} is not a directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    if not os.path.isfile(weights_file):
        pickled = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        hint = (" It has adapter_model.bin: pickle files are never loaded; re-save the adapter with "
                "save_pretrained(dir, safe_serialization=True).") if pickled else ""
        raise PeftImportError(f"{weights_file} not found.{hint}")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise PeftImportError(f"{config_file} not found: a PEFT adapter directory needs its config") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftImportError(f"{config_file} is not valid JSON: {e}") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise PeftImportError(f"{config_file}: peft_type {peft_type!r} is not supported (only LORA adapters can "
                              f"become experts)")
    for key, default in _UNSUPPORTED.items():
        value = config.get(key, default)
        if value and value != default:
            raise PeftImportError(f"{config_file}: {key}={value!r} is not supported (an MoA expert is a plain "
                                  f"LoRA delta x A B on the seven Llama projections)")
    try:
        raw = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise PeftImportError(f"{weights_file} is not a valid safetensors file: {e}") from None
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    dtypes = {str(v.dtype) for v in raw.values()}
    for key, value in raw.items():
        m = _KEY.match(key)
        if m is None:
            raise PeftImportError(f"{weights_file}: tensor {key!r} is not a LoRA A/B weight of a decoder-layer "
                                  f"projection ({', '.join(PROJECTIONS)}); such adapters cannot become experts")
        layer, module, proj, half = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if MODULE_OF.get(proj) != module:
            raise PeftImportError(f"{weights_file}: tensor {key!r}: {module}.{proj} is not one of the seven "
                                  f"Llama-family projections ({', '.join(PROJECTIONS)})")
        if layer >= cfg.num_layers:
            raise PeftImportError(f"{weights_file}: tensor {key!r} adapts layer {layer}, but the base model has "
                                  f"{cfg.num_layers} layers: the adapter was trained for another architecture")
        halves.setdefault((layer, proj), {})[half] = np.asarray(value, np.float32)
    tensors = {}
    for (layer, proj), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise PeftImportError(f"{weights_file}: layer {layer} {proj} has lora_{''.join(ab)} but not its pair")
        a, b = ab["A"], ab["B"]
        d_in, d_out = cfg.projection_shape(proj)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
            raise PeftImportError(
                f"{weights_file}: layer {layer} {proj} has lora_A {a.shape} and lora_B {b.shape}; this base model "
                f"needs lora_A [r, {d_in}] and lora_B [{d_out}, r]: the adapter was trained for another architecture")
        tensors[(layer, proj)] = (a, b)
    if not tensors:
        raise PeftImportError(f"{weights_file} holds no LoRA tensors")
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    return PeftAdapter(os.path.abspath(path), config, tensors, dtype if dtype in DTYPES else "float32")


def experts_moa(adapters: Sequence[PeftAdapter], moa: Optional[MoAConfig] = None) -> MoAConfig:
    """The MoAConfig that holds every adapter exactly (see the module docstring); a given `moa` is checked."""
    targets = tuple(p for p in PROJECTIONS if any(p == proj for a in adapters for _, proj in a.tensors))
    max_rank = max(max(a.ranks) for a in adapters)
    if moa is not None:
        if moa.num_experts != len(adapters):
            raise PeftImportError(f"moa.num_experts={moa.num_experts} but {len(adapters)} adapters were given")
        missing = [p for p in targets if p not in moa.targets]
        if missing or moa.rank < max_rank:
            raise PeftImportError(f"the given MoAConfig (rank {moa.rank}, targets {list(moa.targets)}) cannot hold "
                                  f"these adapters (rank up to {max_rank}, targets {list(targets)})")
        return moa
    first = adapters[0].config
    uniform = all(a.ranks == {max_rank} and a.config.get("lora_alpha") == first.get("lora_alpha")
                  and bool(a.config.get("use_rslora", False)) == bool(first.get("use_rslora", False))
                  for a in adapters)
    dropout = float(first.get("lora_dropout", 0.0) or 0.0)
    if uniform:
        return MoAConfig(num_experts=len(adapters), rank=max_rank, alpha=float(first.get("lora_alpha", 8)),
                         use_rslora=bool(first.get("use_rslora", False)), dropout=dropout, targets=targets)
    return MoAConfig(num_experts=len(adapters), rank=max_rank, alpha=float(max_rank), use_rslora=False,
                     dropout=dropout, targets=targets)


def stack_experts(adapters: Sequence[PeftAdapter], cfg: ModelConfig, moa: MoAConfig) -> dict:
    """-> {("layers", group, proj, "lora_a"|"lora_b"): [L, E, Din, R] | [L, E, R, Dout]} in moa.adapter_dtype."""
    out = {}
    for proj in moa.targets:
        d_in, d_out = cfg.projection_shape(proj)
        lora_a = np.zeros((cfg.num_layers, moa.num_experts, d_in, moa.rank), np.float32)   # (L, E, Din, R)
        lora_b = np.zeros((cfg.num_layers, moa.num_experts, moa.rank, d_out), np.float32)  # (L, E, R, Dout)
        for e, adapter in enumerate(adapters):
            for (layer, p), (a, b) in adapter.tensors.items():
                if p != proj:
                    continue
                r = a.shape[0]
                ratio = adapter.scale(r) / moa.scale   # exactly 1.0 when the MoAConfig took this adapter's scale
                lora_a[layer, e, :, :r] = a.T
                lora_b[layer, e, :r, :] = b.T if ratio == 1.0 else b.T * np.float32(ratio)
        group = GROUP[MODULE_OF[proj]]
        dtype = numpy_dtype(moa.adapter_dtype)
        out[("layers", group, proj, "lora_a")] = lora_a.astype(dtype, copy=False)
        out[("layers", group, proj, "lora_b")] = lora_b.astype(dtype, copy=False)
    return out


def read_peft_experts(adapter_dirs: Sequence[str], cfg: ModelConfig, *, names: Optional[Sequence[str]] = None,
                      moa: Optional[MoAConfig] = None) -> PeftExperts:
    """Reads every adapter directory and stacks them as experts, in the order given (expert e = adapter_dirs[e]).
    names: one per adapter (default: each directory's base name); they must be distinct."""
    if isinstance(adapter_dirs, (str, os.PathLike)):
        adapter_dirs = [adapter_dirs]
    if not adapter_dirs:
        raise PeftImportError("no PEFT adapter directories given")
    dirs = [os.fspath(d) for d in adapter_dirs]
    names = tuple(names) if names is not None else tuple(os.path.basename(os.path.normpath(d)) for d in dirs)
    if len(names) != len(dirs):
        raise PeftImportError(f"{len(names)} names for {len(dirs)} adapter directories")
    for d, n in zip(dirs, names):
        check_name(n, f"PEFT adapter {d}", PeftImportError)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PeftImportError(f"expert names must be distinct; {duplicates} name more than one adapter "
                              f"(pass names=[...])")
    adapters = [read_peft_adapter(d, cfg) for d in dirs]
    moa = experts_moa(adapters, moa)
    return PeftExperts(moa, names, stack_experts(adapters, cfg, moa),
                       str(adapters[0].config.get("base_model_name_or_path") or ""),
                       tuple(expert_layout(a) for a in adapters))


def parse_adapter_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """["DIR", "name=DIR", ...] -> [(name, DIR)] (name: the directory's base name unless given); checks that each
    directory holds an adapter, so a typo fails before any model is loaded."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        path = os.path.expanduser(path)
        for required in (CONFIG_FILE, WEIGHTS_FILE):
            if not os.path.isfile(os.path.join(path, required)):
                raise PeftImportError(f"init_from_peft: {os.path.join(path, required)} not found (each entry is a "
                                      f"PEFT adapter directory, optionally as domain=DIR)")
        out.append((check_name(name.strip(), f"init_from_peft {spec!r}", PeftImportError), path))
    return out


def experts_for_domains(specs: Sequence[str], domains: Sequence[str], cfg: ModelConfig,
                        moa: MoAConfig) -> dict:
    """The adapters named by `specs`, one per domain, stacked in the domains' order (expert e = domains[e]) for the
    experiment's MoAConfig -> the lora_a / lora_b leaves (see stack_experts). Names map adapters to domains."""
    named = dict(parse_adapter_specs(specs))
    if len(named) != len(specs):
        raise PeftImportError(f"init_from_peft: two adapters have the same name ({list(named)}); name them "
                              f"explicitly as domain=DIR")
    missing, unknown = [d for d in domains if d not in named], [n for n in named if n not in domains]
    if missing or unknown:
        raise PeftImportError(f"init_from_peft: adapters are matched to domains by name; domains without an "
                              f"adapter: {missing}, adapters naming no domain: {unknown} (domains: {list(domains)}; "
                              f"write domain=DIR to name one)")
    return read_peft_experts([named[d] for d in domains], cfg, names=domains, moa=moa).lora
