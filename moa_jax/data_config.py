"""DataConfig: where training and evaluation examples come from, how they are tokenised and how they are mixed
(and packed) into fixed-shape batches; moa_jax.config re-exports it with the other configs.

Shape glossary: B batch (rows), T tokens, G examples in a packed row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moa_jax.config_fields import setting
from moa_jax.errors import require as _check

DATA_MIXING = ("uniform", "proportional", "temperature")
LENGTH_POLICIES = ("drop", "truncate_left", "error")
PACKING = ("none", "domain")
DATA_SPLITS = ("train", "validation", "test")
PROMPT_FORMATS = ("auto", "chat", "plain")   # moa_jax/data/prompt_format.py


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from, how they are tokenised and how they are mixed into fixed-shape batches.

    source: "moa_tasks" (the embedded 10-task tfds dataset; `builder_config` picks its size),
            "jsonl:DIR" (your JSONL files, see docs/data.md), "tfds:NAME[/CONFIG][:VERSION]" (a tfds catalog
            dataset read with `field_map`; needs the dataset prepared in `data_dir`) or "hf:NAME[:CONFIG]" (a
            Hugging Face dataset, a Hub id or a local dataset directory, read with `field_map`; a missing
            validation/test split is carved from train with `holdout_fraction`).
    """
    source: str = setting("moa_tasks", "function", "locked")
    builder_config: str = setting("default", "locked")   # moa_tasks only: default (2000/200/200 per domain) | small | tiny | large
    data_dir: Optional[str] = None    # tfds data dir; None -> $MOA_JAX_DATA_DIR or ~/.cache/moa_jax/tfds
    domains: tuple = setting((), "locked")   # subset and order of domains (expert ids follow it); () = all of the source
    field_map: str = ""               # tfds/hf source: "prompt=question,response=answer[,domain=label]"
    holdout_fraction: float = 0.05    # flat JSONL dirs, hf datasets without validation/test: share of prompts
                                      # hashed to each of validation and test
    system_prompt: Optional[str] = "auto"  # "auto": short task prompt for moa_tasks, template default otherwise;
                                           # None: template default; any string (even ""): that system message
    prompt_format: str = setting("auto", "function", "locked", absent="chat")   # chat (the tokenizer's template) |
                                      # plain (base models: moa_jax/data/prompt_format.py) | auto (chat iff the
                                      # tokenizer has a template; runs record the resolved value)
    max_len: int = 256                # longest tokenised example kept (prompt + response + eos)
    length_policy: str = "drop"       # over-long examples: drop (counted + logged) | truncate_left | error
    buckets: tuple[int, ...] = (64, 128, 256)  # padded lengths T; a batch uses the smallest bucket that fits it
    batch_size: int = 8               # global batch B (all hosts together)
    eval_batch_size: int = setting(0, "inert")   # 0 -> batch_size
    mixing: str = "uniform"           # domain weights: uniform | proportional (to size) | temperature
    temperature: float = 2.0          # temperature mixing: weight ~ size ** (1 / temperature)
    packing: str = setting("none", absent="none")   # training rows: none (one example each) | domain (consecutive examples of one
                                      # domain up to the largest bucket; moa_jax/data/packing.py)
    max_segments: int = setting(8, absent=8)   # packing: most examples in one row (G, a static shape)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "domains", tuple(self.domains))
        object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
        _check(self.source == "moa_tasks" or (self.source.startswith(("jsonl:", "tfds:", "hf:"))
                                               and len(self.source.split(":", 1)[1]) > 0),
               f"DataConfig.source={self.source!r}: use 'moa_tasks', 'jsonl:DIR', 'tfds:NAME' or "
               f"'hf:NAME[:CONFIG]'")
        _check(self.mixing in DATA_MIXING, f"DataConfig.mixing={self.mixing!r} not in {DATA_MIXING}")
        _check(self.temperature > 0, f"DataConfig.temperature must be > 0, got {self.temperature}")
        _check(self.prompt_format in PROMPT_FORMATS,
               f"DataConfig.prompt_format={self.prompt_format!r} not in {PROMPT_FORMATS}")
        _check(self.packing in PACKING, f"DataConfig.packing={self.packing!r} not in {PACKING}")
        _check(self.max_segments >= 1, f"DataConfig.max_segments must be >= 1, got {self.max_segments}")
        _check(self.length_policy in LENGTH_POLICIES,
               f"DataConfig.length_policy={self.length_policy!r} not in {LENGTH_POLICIES}")
        _check(len(self.buckets) > 0 and all(b > 0 for b in self.buckets)
               and list(self.buckets) == sorted(set(self.buckets)),
               f"DataConfig.buckets={self.buckets} must be positive and strictly increasing")
        _check(1 < self.max_len <= self.buckets[-1],
               f"DataConfig.max_len={self.max_len} must be in [2, largest bucket {self.buckets[-1]}]")
        _check(self.batch_size >= 1, f"DataConfig.batch_size must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 0, f"DataConfig.eval_batch_size must be >= 0, got {self.eval_batch_size}")
        _check(0.0 <= self.holdout_fraction < 0.5,
               f"DataConfig.holdout_fraction must be in [0, 0.5), got {self.holdout_fraction}")
        _check(0 <= self.seed < 2 ** 31, f"DataConfig.seed must be in [0, 2**31), got {self.seed}")

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size
