"""`--set key=value` overrides, typed against the frozen config dataclasses.

Keys are dotted paths into nested dataclasses (`stage1.steps=20`, `moa.rank=8`, `moa.targets=q,v`). Values are
parsed by the field's annotated type (int, float, bool, str, tuple of str, Optional[...]); an unknown key is
rejected with the list of valid keys, a bad value with the field and the expected type.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Sequence

from moa_jax.config import ConfigError

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def valid_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _parse(raw: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if raw.lower() in ("none", "null", ""):
            return None
        return _parse(raw, next(a for a in args if a is not type(None)), key)
    if annotation is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"--set {key}={raw!r}: expected a boolean (true/false)")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            raise ConfigError(f"--set {key}={raw!r}: expected {annotation.__name__}") from None
    if annotation is tuple or origin is tuple:
        items = tuple(s.strip() for s in raw.split(",") if s.strip())
        inner = args[0] if args and args[0] is not Ellipsis else str
        return tuple(_parse(s, inner, key) for s in items)
    return raw


def apply_overrides(cfg: Any, assignments: Sequence[str]) -> Any:
    """Return a copy of `cfg` with every `key=value` applied (validation re-runs in __post_init__)."""
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"--set {assignment!r}: expected key=value")
        key, raw = assignment.split("=", 1)
        cfg = _set(cfg, key.strip().split("."), raw.strip(), key.strip(), cfg)
    return cfg


def _set(node: Any, path: list[str], raw: str, key: str, root: Any) -> Any:
    hints = typing.get_type_hints(type(node))
    if path[0] not in hints or not any(f.name == path[0] for f in dataclasses.fields(node)):
        raise ConfigError(f"--set {key}: unknown key. Valid keys: {', '.join(valid_keys(root))}")
    current = getattr(node, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"--set {key}: {path[0]} has no sub-fields. Valid keys: {', '.join(valid_keys(root))}")
        return dataclasses.replace(node, **{path[0]: _set(current, path[1:], raw, key, root)})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"--set {key}: is a section; set one of its fields, e.g. {key}.{dataclasses.fields(current)[0].name}")
    return dataclasses.replace(node, **{path[0]: _parse(raw, hints[path[0]], key)})
