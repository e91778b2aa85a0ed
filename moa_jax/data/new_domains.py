"""New domains for `add_domain`: parse the `new_domains` specs and read their examples, split like the base run's.

A spec is one of
  GENERATOR              a reasoning-gym dataset name (e.g. `basic_arithmetic`), generated the way the embedded
                         dataset is: a fixed seed (from the name), distinct prompts, the test split cut first, then
                         validation, then train, with as many examples per split as each of the base run's domains
                         has; an embedded domain's name uses its fixed configuration (moa_jax/data/tasks.py)
  jsonl:PATH             one JSONL file (docs/data.md line format) holding ONE domain; its name is the lines'
                         "domain" value or else the file stem; each line goes to train/validation/test by the same
                         prompt hash as a flat JSONL folder (DataConfig.holdout_fraction)
  NAME=GENERATOR, NAME=jsonl:PATH   the same, with the domain (expert) named NAME
Every name, given or read from the file, follows moa_jax/names.py.
Shape glossary: N examples of one domain in one split.
"""
from __future__ import annotations

import dataclasses
import os
import zlib

from moa_jax.config import DATA_SPLITS
from moa_jax.data import tasks
from moa_jax.data.jsonl_records import hash_split, read_jsonl_file
from moa_jax.data.sources import TextSplit
from moa_jax.data.tasks import DataError
from moa_jax.names import check_name


@dataclasses.dataclass(frozen=True)
class NewDomain:
    name: str
    kind: str      # "generator" | "jsonl"
    source: str    # the generator's name, or the JSONL file's path


def parse_new_domains(specs) -> list[NewDomain]:
    """`new_domains` specs -> NewDomain list (files are read here too, for the domain name). Errors name the spec."""
    if not specs:
        raise DataError("new_domains is empty: --set add_domain.new_domains=SPEC with SPEC a reasoning-gym generator "
                        "(e.g. basic_arithmetic) or jsonl:PATH (several: comma-separated)")
    out = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or name.startswith("jsonl:"):
            name, rest = "", spec
        name, rest = name.strip(), rest.strip()
        if name:
            check_name(name, f"new_domains {spec!r}", DataError)
        if rest.startswith("jsonl:"):
            path = os.path.expanduser(rest[len("jsonl:"):])
            if not os.path.isfile(path):
                raise DataError(f"new_domains {spec!r}: {path} is not a file; give jsonl:PATH of one JSONL file "
                                f"(docs/data.md)")
            out.append(NewDomain(name or _jsonl_domain(path), "jsonl", path))
        else:
            _check_generator(rest, spec)
            out.append(NewDomain(name or rest, "generator", rest))
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise DataError(f"new_domains: duplicate domain name in {names}; name them apart with NAME=SPEC")
    return out


def _check_generator(generator: str, spec: str) -> None:
    import reasoning_gym.factory
    if generator not in reasoning_gym.factory.DATASETS:
        known = sorted(reasoning_gym.factory.DATASETS)
        raise DataError(f"new_domains {spec!r}: {generator!r} is neither jsonl:PATH nor a reasoning-gym generator "
                        f"({len(known)} known, e.g. {', '.join(known[:6])}, basic_arithmetic)")


def _jsonl_domain(path: str) -> str:
    """The one domain a JSONL file holds (its lines' "domain", else the file stem)."""
    stem = os.path.basename(path).rsplit(".", 1)[0]
    names = {domain for _, domain, _ in read_jsonl_file(path, stem)}
    if not names:
        raise DataError(f"{path}: no examples (empty file)")
    if len(names) > 1:
        raise DataError(f"{path}: holds domains {sorted(names)}; add_domain takes one domain per file (split it, "
                        f"or give each file its own new_domains entry)")
    return names.pop()


def _generator_domain(d: NewDomain) -> tasks.Domain:
    if d.source in tasks.DOMAIN_NAMES:
        return dataclasses.replace(tasks.get_domain(d.source), name=d.name)
    return tasks.Domain(d.name, d.source, "reasoning-gym (default options)", 1000 + zlib.crc32(d.name.encode()) % 10**6)


def _generated(d: NewDomain, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Test, validation, train cut from one stream of distinct prompts (as the embedded builder does)."""
    stream = tasks.generate(_generator_domain(d), sum(sizes.values()))
    out = {}
    for split in ("test", "validation", "train"):
        out[split] = [{"messages": [{"role": "user", "content": item["prompt"]}], "response": item["answer"],
                       "answer": item["answer"], "metadata": item["metadata"]}
                      for item in (next(stream) for _ in range(sizes[split]))]
    return out


def _from_jsonl(d: NewDomain, holdout_fraction: float) -> dict[str, list[dict]]:
    out = {s: [] for s in DATA_SPLITS}
    for _, _, ex in read_jsonl_file(d.source, d.name):
        out[hash_split(ex, holdout_fraction)].append(ex)
    empty = [s for s, exs in out.items() if not exs]
    if empty:
        raise DataError(f"{d.source}: no line falls in the {'/'.join(empty)} split(s) (each gets ~"
                        f"{holdout_fraction:.0%} of the prompts by hash, data.holdout_fraction); give more lines")
    return out


def new_domain_examples(domains: list[NewDomain], sizes: dict[str, int], holdout_fraction: float
                        ) -> dict[str, dict[str, list[dict]]]:
    """-> split -> domain name -> examples. `sizes`: examples per split of a generated domain."""
    out: dict[str, dict[str, list[dict]]] = {s: {} for s in DATA_SPLITS}
    for d in domains:
        per_split = _generated(d, sizes) if d.kind == "generator" else _from_jsonl(d, holdout_fraction)
        for split, exs in per_split.items():
            out[split][d.name] = exs
    return out


def extend_split(old: TextSplit, new: dict[str, list[dict]]) -> TextSplit:
    """The base run's split with the new domains appended (their ids follow the old ones)."""
    return dataclasses.replace(old, name=old.name + "+" + ",".join(new), domains=tuple(old.domains) + tuple(new),
                               examples={**old.examples, **new}, census=None)


def only(ts: TextSplit, names) -> TextSplit:
    """The split restricted to the domains `names` (ids renumbered from 0)."""
    return dataclasses.replace(ts, domains=tuple(names), examples={n: ts.examples[n] for n in names}, census=None)
