"""`--set key=value` overrides, typed against the frozen config dataclasses.

Keys are dotted paths into nested dataclasses (`stage1.steps=20`, `moa.rank=8`, `moa.targets=q,v`). Values are
parsed by the field's annotated type (int, float, bool, str, tuple of str or int, Optional[...]: "none"/"null",
or an empty value for non-string types, give None); an unknown key is rejected with the list of valid keys, a bad
value with the field and the expected type. All overrides of one dataclass are applied together (validation runs
once, on the result), so their order does not matter: `data.buckets=64,128 data.max_len=128` works either way.
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
        inner = next(a for a in args if a is not type(None))
        if raw.lower() in ("none", "null") or (raw == "" and inner is not str):  # "" is a valid string value
            return None
        return _parse(raw, inner, key)
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
    """Return a copy of `cfg` with every `key=value` applied (validation re-runs in __post_init__). A key set twice
    takes its last value."""
    changes: dict[tuple[str, ...], Any] = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"--set {assignment!r}: expected key=value")
        key, raw = assignment.split("=", 1)
        path = tuple(key.strip().split("."))
        changes[path] = _parse(raw.strip(), _annotation(cfg, path, key.strip()), key.strip())
    return _replace(cfg, changes)


def _annotation(root: Any, path: tuple[str, ...], key: str) -> Any:
    """The annotated type of the field at `path`; unknown keys and sections are refused."""
    node = root
    for i, name in enumerate(path):
        hints = typing.get_type_hints(type(node))
        if name not in hints or not any(f.name == name for f in dataclasses.fields(node)):
            raise ConfigError(f"--set {key}: unknown key. Valid keys: {', '.join(valid_keys(root))}")
        current = getattr(node, name)
        if i == len(path) - 1:
            if dataclasses.is_dataclass(current):
                raise ConfigError(f"--set {key}: is a section; set one of its fields, e.g. "
                                  f"{key}.{dataclasses.fields(current)[0].name}")
            return hints[name]
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"--set {key}: {name} has no sub-fields. Valid keys: {', '.join(valid_keys(root))}")
        node = current


def _replace(node: Any, changes: dict[tuple[str, ...], Any]) -> Any:
    """One dataclasses.replace per changed dataclass, innermost first."""
    direct = {path[0]: value for path, value in changes.items() if len(path) == 1}
    for name in {path[0] for path in changes if len(path) > 1}:
        inner = {path[1:]: value for path, value in changes.items() if len(path) > 1 and path[0] == name}
        direct[name] = _replace(getattr(node, name), inner)
    return dataclasses.replace(node, **direct)
