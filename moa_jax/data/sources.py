"""Where text examples come from: the embedded moa_tasks builder, a directory of JSONL files, a tfds catalog dataset,
a Hugging Face dataset (`hf:NAME[:CONFIG]`, a Hub id or a local dataset directory).

Every source returns a `TextSplit`: for each domain (in a fixed order that defines the domain ids = expert ids)
the list of examples of one split. An example is a dict with
  messages  list of {"role", "content"}: the prompt conversation (system/user/assistant turns before the answer)
  response  str: the text the model learns to produce (the loss is on it and the eos after it)
  answer    str: reference answer for generation-based scoring ("" when unknown; = response for JSONL)
  metadata  str: JSON for the domain's verifier ("" when none)
Shape glossary: N examples of one domain in one split.

tfds and hf sources map their columns with DataConfig.field_map ("prompt=COL,response=COL[,domain=COL]", one rule:
`parse_field_map` + `_mapped_examples`); without a domain column the whole dataset is one domain named after it.

JSONL layout (docs/data.md; one file, line by line: moa_jax/data/jsonl_records.py): DIR/<split>/*.jsonl, or flat
DIR/*.jsonl where each prompt is assigned to train/validation/test by a hash of its text (stable, disjoint).
Domain = file stem unless a line has "domain". Each line: {"prompt": str, "response": str} or {"messages":
[{"role", "content"}, ..., assistant last]}; a UTF-8 byte-order mark at the start of a file is accepted. With
line-level domains a `DomainCensus` (domain -> lines per file) backs the domain table that `inspect` and the run log
print, and warns about a domain that looks like a typo (under 1% of the lines, or found only inside another domain's
file).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from moa_jax.config import DATA_SPLITS, DataConfig
from moa_jax.data import tasks
from moa_jax.data.jsonl_records import hash_split, parse_record, read_jsonl_file
from moa_jax.data.tasks import DataError
from moa_jax.names import check_name

log = logging.getLogger("moa_jax.data")


@dataclasses.dataclass
class TextSplit:
    """One split of a source, grouped by domain; `domains` order = domain ids."""
    name: str                         # e.g. "moa_tasks/default:train"
    domains: tuple[str, ...]
    examples: dict[str, list[dict]]   # domain -> N examples
    census: Optional["DomainCensus"] = None      # JSONL sources: where each domain's lines came from

    def counts(self) -> dict[str, int]:
        return {d: len(self.examples[d]) for d in self.domains}


@dataclasses.dataclass
class DomainCensus:
    """JSONL lines per domain and file of one folder; `line_level`: some line named its domain ("domain" key)."""
    files: dict[str, dict[str, int]]   # domain -> {file name: lines}
    line_level: bool = False

    @property
    def total(self) -> int:
        return sum(sum(f.values()) for f in self.files.values())

    def table(self) -> str:
        width = max([24] + [len(d) + 2 for d in self.files])
        rows = [f"{'domain':<{width}}{'lines':>7}  source files"]
        rows += [f"{d:<{width}}{sum(f.values()):>7}  " + ", ".join(f"{n} ({c})" for n, c in sorted(f.items()))
                 for d, f in sorted(self.files.items())]
        return "\n".join(rows)

    def warnings(self) -> list[str]:
        """Domains that look like a typo in a line's "domain" value (a typo would add an expert)."""
        out = []
        for d, files in sorted(self.files.items()):
            n, stems = sum(files.values()), {f[:-len(".jsonl")] for f in files}
            if n < 0.01 * self.total:
                out.append(f"domain {d!r} has only {n} of {self.total} lines (< 1%), in {sorted(files)}: a typo "
                           f"in a line's \"domain\" value? Each domain trains its own expert")
            elif d not in stems and stems <= set(self.files):
                out.append(f"domain {d!r} appears only in {sorted(files)}, whose lines otherwise belong to domain(s) "
                           f"{sorted(stems)}: a typo in a line's \"domain\" value? Each domain trains its own expert")
        return out


def resolve_system_prompt(setting: Optional[str], source: str) -> Optional[str]:
    """DataConfig.system_prompt for data from `source` -> the system message put before each prompt, or None
    for none (the chat template's own default then applies). The one rule, used by tokenisation, `inspect`,
    `moa_jax.generate` and `moa_jax.load_run`: "auto" is the short task prompt for the embedded moa_tasks (its
    answers are bare values) and none for any other source; any other string (even "") is used as is."""
    if setting != "auto":
        return setting
    return tasks.TASK_SYSTEM_PROMPT if source == "moa_tasks" else None


def load_text_split(cfg: DataConfig, split: str) -> TextSplit:
    """Reads one split of `cfg.source`, restricted to and ordered by `cfg.domains` (all when empty)."""
    if split not in DATA_SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {list(DATA_SPLITS)}")
    if cfg.source == "moa_tasks":
        out = _load_moa_tasks(cfg, split)
    elif cfg.source.startswith("jsonl:"):
        out = _load_jsonl_dir(cfg.source[len("jsonl:"):], split, cfg.holdout_fraction)
    elif cfg.source.startswith("hf:"):
        out = _load_hf_dataset(cfg.source[len("hf:"):], split, cfg.field_map, cfg.holdout_fraction)
    else:
        out = _load_tfds_catalog(cfg.source[len("tfds:"):], split, cfg.field_map, cfg.data_dir, cfg.domains)
    return _select_domains(out, cfg.domains)


def _select_domains(ts: TextSplit, wanted: tuple) -> TextSplit:
    if wanted:
        missing = [d for d in wanted if d not in ts.examples]
        if missing:
            raise DataError(f"{ts.name}: unknown domain(s) {missing}; the source has {sorted(ts.examples)}")
        if len(set(wanted)) != len(wanted):
            raise DataError(f"duplicate domain in DataConfig.domains={list(wanted)}")
        ts = dataclasses.replace(ts, domains=tuple(wanted), examples={d: ts.examples[d] for d in wanted})
    empty = [d for d in ts.domains if not ts.examples[d]]
    if empty:
        raise DataError(f"{ts.name}: domain(s) {empty} have no examples in this split")
    if not ts.domains:
        raise DataError(f"{ts.name}: no domains found")
    return ts


# ---- embedded ----
def _load_moa_tasks(cfg: DataConfig, split: str) -> TextSplit:
    from moa_jax.data.moa_tasks import prepare
    if cfg.domains:
        tasks.resolve_domains(cfg.domains)  # unknown names fail with the list of the ten
    builder = prepare(cfg.builder_config, cfg.data_dir)
    source = builder.as_data_source()[split]
    names = builder.info.features["domain"].names
    rows = source.__getitems__(range(len(source)))  # the whole split is a few MB of text
    examples = {n: [] for n in names}
    for r in sorted(rows, key=lambda r: (r["domain"], r["index"])):  # storage order is hashed; restore ours
        answer = r["answer"].decode()
        examples[names[r["domain"]]].append({
            "messages": [{"role": "user", "content": r["prompt"].decode()}], "response": answer,
            "answer": answer, "metadata": r["metadata"].decode()})
    return TextSplit(f"moa_tasks/{cfg.builder_config}:{split}", tuple(names), examples)


# ---- JSONL ----
def _load_jsonl_dir(path: str, split: str, holdout_fraction: float) -> TextSplit:
    if not os.path.isdir(path):
        raise DataError(f"jsonl source {path!r} is not a directory")
    split_dirs = [s for s in DATA_SPLITS if os.path.isdir(os.path.join(path, s))]
    name = f"jsonl:{path}:{split}"
    if split_dirs:
        if split not in split_dirs:
            raise DataError(f"{path}: has split folders {split_dirs} but no {split!r}/ folder")
        # Domain ids must not depend on the split: the universe is every domain of every split folder.
        per_split = {s: _read_jsonl_files(os.path.join(path, s)) for s in split_dirs}
        universe = sorted(set().union(*(exs for exs, _ in per_split.values())))
        examples = {d: per_split[split][0].get(d, []) for d in universe}
        return TextSplit(name, tuple(universe), examples, census=per_split[split][1])
    everything, census = _read_jsonl_files(path)
    # Flat layout: a stable hash of the prompt picks the split, so splits are disjoint and duplicates stay together.
    examples = {d: [e for e in exs if hash_split(e, holdout_fraction) == split] for d, exs in everything.items()}
    return TextSplit(name, tuple(sorted(everything)), examples, census=census)


def _read_jsonl_files(folder: str) -> tuple[dict[str, list[dict]], DomainCensus]:
    files = sorted(f for f in os.listdir(folder) if f.endswith(".jsonl"))
    if not files:
        raise DataError(f"{folder}: no *.jsonl files")
    examples: dict[str, list[dict]] = {}
    census = DomainCensus({})
    for f in files:
        path = os.path.join(folder, f)
        stem = f[:-len(".jsonl")]
        n_before = sum(map(len, examples.values()))
        for obj, domain, ex in read_jsonl_file(path, stem):
            examples.setdefault(domain, []).append(ex)
            per_file = census.files.setdefault(domain, {})
            per_file[f] = per_file.get(f, 0) + 1
            census.line_level = census.line_level or (isinstance(obj, dict) and "domain" in obj)
        if sum(map(len, examples.values())) == n_before:
            raise DataError(f"{path}: no examples (empty file)")
    return examples, census


# ---- tfds catalog ----
def parse_field_map(spec: str) -> dict[str, str]:
    """"prompt=question,response=answer[,domain=label]" -> {"prompt": "question", ...}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("prompt", "response", "domain") or not value.strip():
            raise DataError(f"DataConfig.field_map: bad entry {part!r}; write prompt=FIELD,response=FIELD"
                            f"[,domain=FIELD]")
        out[key.strip()] = value.strip()
    for key in ("prompt", "response"):
        if key not in out:
            raise DataError(f"DataConfig.field_map={spec!r} does not map {key!r} (e.g. '{key}=text')")
    return out


def _load_tfds_catalog(name: str, split: str, field_map: str, data_dir: Optional[str],
                       wanted_domains: tuple = ()) -> TextSplit:
    """Any tfds dataset (prepared as array_record in `data_dir`, or preparable there) with a field mapping.
    Without a `domain` field the whole dataset is one domain named after it."""
    import tensorflow_datasets as tfds
    fields = parse_field_map(field_map)
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        log.info("preparing tfds dataset %s in %s", name, builder.data_dir)
        builder.download_and_prepare(file_format="array_record")
    sources = builder.as_data_source()
    if split not in sources:
        raise DataError(f"tfds:{name} has splits {sorted(sources)}, not {split!r}")
    source = sources[split]
    features = builder.info.features
    _check_fields(f"tfds:{name}", fields, features)
    label_names = getattr(features[fields["domain"]], "names", None) if "domain" in fields else None
    if "domain" in fields and label_names is None and not wanted_domains:
        # A free-text domain field could hold different domains in different splits, shifting expert ids.
        raise DataError(f"tfds:{name}: domain field {fields['domain']!r} is not a ClassLabel; set "
                        f"DataConfig.domains to fix the domain (expert) order")
    default_domain = name.split(":")[0].replace("/", "_")
    universe = list(label_names) if label_names is not None else list(wanted_domains) or [default_domain]
    examples = _mapped_examples(source.__getitems__(range(len(source))), fields, label_names, universe,
                                default_domain, f"tfds:{name}[{split}]")
    return TextSplit(f"tfds:{name}:{split}", tuple(universe), examples)


def _check_fields(where: str, fields: dict[str, str], columns) -> None:
    for key, field in fields.items():
        if field not in columns:
            raise DataError(f"{where}: field_map {key}={field!r}, but its features are {sorted(columns)}")


def _mapped_examples(rows, fields: dict[str, str], label_names, universe: list, default_domain: str,
                     where: str) -> dict[str, list[dict]]:
    """Rows of a tfds/hf split -> domain -> examples, through the field map (a class-label domain column holds
    indices into `label_names`)."""
    for d in universe:   # a class label no row uses still names an expert
        check_name(d, f"{where}: domain field", DataError)
    examples: dict[str, list[dict]] = {d: [] for d in universe}
    for i, row in enumerate(rows):
        obj = {k: _text(row[f], label_names if k == "domain" else None) for k, f in fields.items()}
        domain, ex = parse_record(obj, where=f"{where}[{i}]", default_domain=default_domain)
        examples.setdefault(domain, []).append(ex)
    return examples


def _text(value, label_names):
    """A cell as text; None (a missing value, or class label -1) stays None so parse_record names the row."""
    if value is None:
        return None
    if label_names is not None and not isinstance(value, (bytes, str)):
        return label_names[int(value)] if 0 <= int(value) < len(label_names) else None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---- Hugging Face datasets ----
# Our split -> the names datasets use for it, in order of preference.
_HF_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


def _load_hf_dataset(spec: str, split: str, field_map: str, holdout_fraction: float) -> TextSplit:
    """`hf:NAME[:CONFIG]`: a Hub dataset id or a local dataset directory, read with `datasets.load_dataset`.
    A split the dataset lacks (validation or test) is carved out of its train split by the prompt hash, like a flat
    JSONL directory (`holdout_fraction` each; those examples leave train). Domain ids come from a class-label
    column's names, or the sorted values of a text column over all splits, so they do not depend on the split."""
    name, _, config = spec.partition(":")
    fields = parse_field_map(field_map)
    ds = _hf_dataset_dict(name, config or None)
    where = f"hf:{spec}"
    found = {ours: next((s for s in names if s in ds), None) for ours, names in _HF_SPLIT_NAMES.items()}
    carved = {s for s in ("validation", "test") if found[s] is None}
    if found["train"] is None or (split in carved and holdout_fraction <= 0):
        missing = "train" if found["train"] is None else sorted(carved)[0]
        raise DataError(f"{where} has splits {sorted(ds)}, none named {list(_HF_SPLIT_NAMES[missing])}"
                        + ("" if missing == "train" else "; set data.holdout_fraction > 0 to carve it from train"))
    _check_fields(where, fields, ds[found["train"]].column_names)
    label_names = getattr(ds[found["train"]].features[fields["domain"]], "names", None) if "domain" in fields else None
    default_domain = os.path.basename(name.rstrip("/"))
    if label_names is not None:
        universe = list(label_names)
    elif "domain" in fields:
        universe = sorted({str(v) for part in ds.values() for v in part.unique(fields["domain"]) if v is not None})
    else:
        universe = [default_domain]
    source = found["train"] if split in carved else found[split]
    rows = ds[source].select_columns(sorted(set(fields.values()))).to_list()
    examples = _mapped_examples(rows, fields, label_names, universe, default_domain, f"{where}[{source}]")
    if split in carved or (split == "train" and carved):   # train keeps what no carved split takes
        if split != "train":
            log.info("%s has no %s split: using %.0f%% of train, chosen by a hash of the prompt", where, split,
                     100 * holdout_fraction)
        keep = {split} if split in carved else {"train"} | ({"validation", "test"} - carved)
        examples = {d: [e for e in exs if hash_split(e, holdout_fraction) in keep] for d, exs in examples.items()}
    return TextSplit(f"{where}:{split}", tuple(universe), examples)


def _hf_dataset_dict(name: str, config: Optional[str]):
    """datasets.DatasetDict of a local dataset directory or a Hub id. The Hub honours HF_HUB_OFFLINE: offline, the
    datasets cache (a dataset loaded once online) is read, else a Hub-cache snapshot (`hf download --repo-type
    dataset NAME`)."""
    import datasets
    from huggingface_hub import constants as hub_constants
    where = f"hf:{name}" + (f":{config}" if config else "")
    path = os.path.expanduser(name)
    try:
        if os.path.isdir(path):
            return datasets.load_dataset(path, config)
        try:
            return datasets.load_dataset(name, config)
        except ConnectionError:
            if not hub_constants.is_offline_mode():
                raise
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import LocalEntryNotFoundError
            try:
                snapshot = snapshot_download(name, repo_type="dataset", local_files_only=True)
            except LocalEntryNotFoundError:
                raise DataError(f"{where}: dataset {name!r} is neither a local directory nor in the Hugging Face "
                                f"caches and HF_HUB_OFFLINE=1; load it once with network access (same HF_HOME) "
                                f"or unset HF_HUB_OFFLINE") from None
            return datasets.load_dataset(snapshot, config)
    except DataError:
        raise
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
        raise DataError(f"{where}: no such dataset: not a local directory, and the Hub says: "
                        f"{str(e).splitlines()[0]}") from None
    except datasets.exceptions.DatasetGenerationError as e:   # a malformed data file
        cause = str(e.__cause__ or e).splitlines()[0]
        raise DataError(f"{where}: its data files cannot be read ({cause})") from None
    except ConnectionError as e:
        raise DataError(f"{where}: the Hub cannot be reached ({e}); check the network, or set HF_HUB_OFFLINE=1 "
                        f"to read the caches") from None
    except ValueError as e:   # e.g. an unknown config: "BuilderConfig 'x' not found. Available: [...]"
        raise DataError(f"{where}: {str(e).splitlines()[0]}") from None
