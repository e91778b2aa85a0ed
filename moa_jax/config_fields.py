"""What each config field means for saved artifacts, declared on the field itself (dataclass field metadata)
instead of in lists of dotted keys kept elsewhere.

    rank: int = setting(16, "function", "locked")       # a field with its roles
    with_role(MoAConfig, "function") -> ("num_experts", "rank", ...)

Roles:
  function  changes the function trained adapters compute: a checkpoint or adapter artifact must match it (resume,
            loading adapters, reuse_from, the work directory); `only_if=(field, value)` limits it to configs where
            another field has that value (top_k counts only with token_topk dispatch)
  shape     ties adapters to the base model's shapes (ModelConfig)
  locked    fixed by the base run when add_domain grows it (the base model, the adapters' shape, the data)
  inert     does not change what a stage learns (logging and checkpoint cadence, an inference policy): ignored when
            deciding whether trained adapters can be reused
  variant   an ablation variant may set it (it acts after stage 1, so variants share stage 1)
  stage2    read by stage 2 only: other stages' reuse ignores it
`absent=VALUE`: the value in effect for configs saved before the field existed, so those runs still compare equal;
`renamed={old: new}`: values saved under an older name.
This module imports nothing from moa_jax, so every config module can use it. No arrays here (no shape glossary).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

ROLES = ("function", "shape", "locked", "inert", "variant", "stage2")
REQUIRED = dataclasses.MISSING   # setting(REQUIRED, ...): a field without a default
_NO_VALUE = object()


def setting(default: Any = dataclasses.MISSING, *roles: str, absent: Any = _NO_VALUE,
            only_if: Optional[tuple] = None, renamed: Optional[dict] = None) -> Any:
    """A dataclass field with its roles (ROLES) and, optionally, its `absent` value, `only_if` condition and
    `renamed` values (old value -> current value, for configs saved before a value was renamed)."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown config field roles {unknown}; known: {ROLES}")
    metadata = {"roles": frozenset(roles), "absent": absent, "only_if": only_if, "renamed": renamed or {}}
    return dataclasses.field(default=default, metadata=metadata)


def roles_of(field: dataclasses.Field) -> frozenset:
    return field.metadata.get("roles", frozenset())


def with_role(cls, role: str) -> tuple[str, ...]:
    """The names of `cls`'s fields that carry `role`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if role in roles_of(f))


def absent_values(cls) -> dict[str, Any]:
    """field name -> the value saved configs without that field ran with."""
    return {f.name: f.metadata["absent"] for f in dataclasses.fields(cls)
            if f.metadata.get("absent", _NO_VALUE) is not _NO_VALUE}


def renamed_values(cls) -> dict[str, dict]:
    """field name -> {old value: current value}."""
    return {f.name: f.metadata["renamed"] for f in dataclasses.fields(cls) if f.metadata.get("renamed")}


def conditions(cls) -> dict[str, tuple]:
    """field name -> (other field, value) under which the field counts."""
    return {f.name: f.metadata["only_if"] for f in dataclasses.fields(cls) if f.metadata.get("only_if")}
