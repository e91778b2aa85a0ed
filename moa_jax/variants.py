"""Ablation variants of an experiment (ExperimentConfig.variants): each is parsed from one spec string
`NAME: key=value; key=value; methods=m1+m2` and trains only what comes after stage 1.

This module imports only the error type and the method registry, so config.py can validate variants with it.
"""
from __future__ import annotations

from dataclasses import dataclass

from moa_jax.errors import ConfigError
from moa_jax.methods import VARIANT_METHODS, unknown_methods


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class Variant:
    """One ablation variant, parsed from its spec string `NAME: key=value; key=value; methods=m1+m2`.

    `sets` are --set style overrides of the experiment (only the keys marked "variant" in moa_jax/config.py, what
    comes after stage 1, so every variant shares the experiment's stage 1; ExperimentConfig checks them); `methods`
    are the methods evaluated for it (default moa_router+moa_oracle), reported as `method[NAME]`. No commas in a spec,
    so a list of specs can be given on the command line: --set "variants=eta0:stage2.eta=0,vote:moa.decision=vote"
    """
    name: str
    sets: tuple = ()
    methods: tuple = ("moa_router", "moa_oracle")


def parse_variant(spec: str) -> Variant:
    name, sep, rest = spec.partition(":")
    name = name.strip()
    _check(bool(sep) and bool(name) and "," not in spec and all(c.isalnum() or c in "._-" for c in name),
           f"variant {spec!r}: expected 'NAME: key=value; ...; methods=a+b' with NAME in letters, digits, '._-' "
           f"and no commas")
    sets, methods = [], Variant.methods
    for part in (p.strip() for p in rest.split(";")):
        if not part:
            continue
        key, eq, value = (s.strip() for s in part.partition("="))
        _check(bool(eq) and bool(key), f"variant {name!r}: {part!r} is not key=value")
        if key == "methods":
            methods = tuple(m.strip() for m in value.split("+") if m.strip())
            bad = unknown_methods(methods, VARIANT_METHODS)
            _check(bool(methods) and not bad, f"variant {name!r}: methods {list(methods)}: each must be one of "
                   f"{VARIANT_METHODS} (joined with '+')")
            continue
        sets.append(f"{key}={value}")
    return Variant(name, tuple(sets), methods)
