"""The input pipeline (grain MapDataset, in-process: no worker processes): domain-balanced mixing, fixed batch
size, a few padded lengths, deterministic, resumable, sharded over hosts.

How a training batch is made (every step is random access, so batch s is a pure function of (seed, s)):
  1. per domain d: its row ids, globally shuffled per epoch (seed derived from (seed, d)), repeated forever;
  2. `MapDataset.mix` interleaves the domains deterministically in proportion to the mixing weights
     (uniform | proportional to size | size ** (1/temperature)); so every batch mixes domains;
  3. consecutive groups of B (the GLOBAL batch size) rows form batch s; with DataConfig.packing='domain' each
     row is several consecutive examples of one domain (moa_jax/data/packing.py), the domains weighted so that
     the EXAMPLE mix is the one above;
  4. the padded length T is the smallest bucket >= the longest row of the global batch (so every host agrees
     and only len(buckets) shapes ever reach the compiler); rows are RIGHT-padded;
  5. host p of P keeps rows [p*B/P, (p+1)*B/P) of the global batch. The global batch does not depend on P,
     so a run can resume on a different number of hosts.
Resuming needs no iterator state: the trainer asks for batch s by index (TrainBatches.batch).

Batch dict (numpy; b = B / P rows on this host, T a bucket):
  tokens int32 [b,T], loss_mask int32 [b,T] (1 on response + eos: targets), prompt_mask int32 [b,T],
  attention_mask int32 [b,T], domain int32 [b], index int32 [b] (row in the TokenizedSplit),
  valid int32 [b] (0 on the padding rows of the last evaluation batch; always 1 in training);
  with packing also segment_ids int32 [b,T] and segment_valid int32 [b,G] (moa_jax/data/packing.py).
"""
from __future__ import annotations

import functools
import sys
from typing import Optional, Sequence

import grain
import numpy as np

from moa_jax.config import DataConfig
from moa_jax.data.sources import TextSplit, load_text_split, resolve_system_prompt
from moa_jax.data.packing import PackedRows, collate_packed
from moa_jax.data.tasks import DataError
from moa_jax.data.tokenize import TokenizedSplit, tokenize_split


def load_split(cfg: DataConfig, tokenizer, split: str = "train", text: Optional[TextSplit] = None) -> TokenizedSplit:
    """Reads (building the embedded dataset on first use; or takes `text`, read earlier) and tokenises one split.
    `.report` holds the length report, which is also logged."""
    text = load_text_split(cfg, split) if text is None else text
    return tokenize_split(text, tokenizer, max_len=cfg.max_len, policy=cfg.length_policy,
                          system_prompt=resolve_system_prompt(cfg.system_prompt, cfg.source),
                          prompt_format=cfg.prompt_format)


def domain_weights(sizes: Sequence[int], mixing: str = "uniform", temperature: float = 2.0) -> np.ndarray:
    """Normalised sampling weight per domain [D]."""
    sizes = np.asarray(sizes, np.float64)
    if mixing == "uniform":
        w = np.ones_like(sizes)
    elif mixing == "proportional":
        w = sizes
    elif mixing == "temperature":
        w = sizes ** (1.0 / temperature)
    else:
        raise DataError(f"unknown mixing {mixing!r}")
    return w / w.sum()


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise DataError(f"an example of {length} tokens exceeds the largest bucket {buckets[-1]}")


def collate(data: TokenizedSplit, rows: np.ndarray, seq_len: int, valid: Optional[np.ndarray] = None) -> dict:
    """Right-padded batch of `rows` [b] at length `seq_len` (T): packed rows of one example each, without segments;
    rows with `valid` 0 are all padding (no tokens, no loss)."""
    out = collate_packed(data, [np.asarray([r]) for r in rows], seq_len, max_segments=1)
    del out["segment_ids"], out["segment_valid"]
    if valid is not None:
        out["valid"] = valid.astype(np.int32)
        for k in ("loss_mask", "prompt_mask", "attention_mask"):
            out[k] *= out["valid"][:, None]
        out["tokens"][~valid.astype(bool)] = data.pad_id
    return out


def collate_rows(split, rows: np.ndarray, batch_size: int, buckets: Sequence[int]) -> list:
    """Right-padded batches of `rows` of a TokenizedSplit, `batch_size` rows each (the last one filled with copies
    whose `valid` is 0), each padded to the smallest bucket that fits it."""
    batches = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        valid = np.ones(batch_size, np.int32)
        valid[len(chunk):] = 0
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk))])
        batches.append(collate(split, padded, bucket_for(int(split.lengths[padded].max()), buckets), valid))
    return batches


def _host_slice(n: int, process_index: int, process_count: int) -> slice:
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} not in [0, process_count={process_count})")
    if n % process_count:
        raise DataError(f"global batch size {n} is not divisible by process_count={process_count}")
    per = n // process_count
    return slice(process_index * per, (process_index + 1) * per)


class _EpochShuffle:
    """k -> the k-th row of domain d's infinite stream: epoch e = k // n is a permutation of the domain's rows
    seeded by (seed, d, e), so every epoch visits every example once and each epoch is ordered differently.
    (numpy permutations, cached per epoch: grain's per-element index_shuffle costs ~1 ms an element here.)"""

    def __init__(self, rows: np.ndarray, seed: int, d: int):
        self.rows, self.seed, self.d = rows, seed, d
        self._cache = (-1, rows)  # (epoch, permuted rows): one tuple, swapped atomically (reader thread)

    def __call__(self, k: int) -> int:
        epoch, i = divmod(int(k), len(self.rows))
        cached_epoch, perm = self._cache
        if epoch != cached_epoch:
            perm = self.rows[np.random.default_rng([self.seed, self.d, epoch]).permutation(len(self.rows))]
            self._cache = (epoch, perm)
        return int(perm[i])


class TrainBatches:
    """This host's training batches by index, without end.

    `batch(s)` is global batch s, this host's rows (a pure function: the trainer's `BatchSource`). With gradient
    accumulation pass `micro_batches=A`: the A micro-batches of one update then share one padded length T (chosen
    over the whole group), so they can be stacked. `weights` [D]: explicit per-domain sampling weights (normalised
    here) instead of DataConfig.mixing's (add_domain's re-fit gives the new domains a fixed share this way).
    """

    def __init__(self, data: TokenizedSplit, cfg: DataConfig, *, process_index: int = 0, process_count: int = 1,
                 micro_batches: int = 1, weights: Optional[Sequence[float]] = None):
        if micro_batches < 1:
            raise DataError(f"micro_batches must be >= 1, got {micro_batches}")
        self.data, self.cfg, self.micro_batches = data, cfg, micro_batches
        self._host = _host_slice(cfg.batch_size, process_index, process_count)
        counts = np.bincount(data.domain, minlength=len(data.domains))
        self.weights = domain_weights(counts, cfg.mixing, cfg.temperature)  # [D], per example
        if weights is not None:
            weights = np.asarray(weights, np.float64)
            if weights.shape != self.weights.shape or not (weights > 0).all():
                raise DataError(f"weights {weights.tolist()}: need {len(self.weights)} positive values, one a domain")
            self.weights = weights / weights.sum()
        streams = [_EpochShuffle(data.domain_rows(d), cfg.seed, d) for d in range(len(data.domains))]
        self._lengths = data.lengths   # [N] tokens per example (a property that runs np.diff: read it once)
        self.packers = None
        if cfg.packing == "domain":
            # rows hold several examples of one domain: weight rows by 1/(examples per row) to keep the example mix
            self.packers = [PackedRows(s, self._lengths, cfg.buckets[-1], cfg.max_segments) for s in streams]
            per_row = np.array([p.mean_examples_per_row(max(int(c), 1)) for p, c in zip(self.packers, counts)])
            row_weights = self.weights / per_row
            self.examples_per_row = float(1.0 / np.sum(row_weights))  # expected, over the mixed stream
            parts = [grain.MapDataset.range(sys.maxsize).map(functools.partial(_row_key, d))
                     for d in range(len(data.domains))]
        else:
            row_weights, self.examples_per_row = self.weights, 1.0
            parts = [grain.MapDataset.range(sys.maxsize).map(s) for s in streams]
        mixed = grain.MapDataset.mix(parts, [float(w) for w in row_weights / row_weights.sum()])
        self.rows = mixed.batch(cfg.batch_size, drop_remainder=True)  # s -> row ids [B] | (domain, row) [B, 2]

    def global_rows(self, index: int) -> list[np.ndarray]:
        """Global batch `index` as example ids per row (one each without packing), every host's rows."""
        keys = np.asarray(self.rows[index], np.int64)
        if self.packers is None:
            return [keys[i:i + 1] for i in range(len(keys))]
        return [self.packers[d](k) for d, k in keys]

    def batch(self, index: int) -> dict:
        """This host's rows of global batch `index` (pure function of seed and index)."""
        groups = self.global_rows(index)
        first = index - index % self.micro_batches
        longest = max(int(self._lengths[g].sum()) for j in range(first, first + self.micro_batches)
                      for g in (groups if j == index else self.global_rows(j)))
        seq_len, mine = bucket_for(longest, self.cfg.buckets), groups[self._host]
        if self.packers is None:
            out = collate(self.data, np.concatenate(mine), seq_len)
        else:
            out = collate_packed(self.data, mine, seq_len, self.cfg.max_segments)
        out["valid"] = np.ones(len(out["domain"]), np.int32)
        return out


class ValidationBatches:
    """A fixed sample of a split to validate on during training, by index (a `BatchSource`): `num_batches` batches of
    cfg.batch_size rows, one example per row, taken round-robin over the domains (each domain's rows in order), all
    padded to one length (one compiled shape). A split with fewer rows fills the last batches with rows whose
    `valid` is 0. batch(i) is this host's rows of batch i."""

    def __init__(self, data: TokenizedSplit, cfg: DataConfig, num_batches: int, *, process_index: int = 0,
                 process_count: int = 1):
        per_domain = [data.domain_rows(d) for d in range(len(data.domains))]
        order = [int(r[k]) for k in range(max((len(r) for r in per_domain), default=0)) for r in per_domain
                 if k < len(r)]
        if not order:
            raise DataError(f"the {data.name} split has no examples to validate on: set the stages' eval_every=0")
        n = num_batches * cfg.batch_size
        rows = np.asarray(order[:n], np.int64)
        self.valid = np.concatenate([np.ones(len(rows), np.int32), np.zeros(n - len(rows), np.int32)])
        self.rows = np.concatenate([rows, np.full(n - len(rows), rows[0])])
        self.examples = len(rows)
        self.seq_len = bucket_for(int(data.lengths[rows].max()), cfg.buckets)
        self.data, self.batch_size = data, cfg.batch_size
        self._host = _host_slice(cfg.batch_size, process_index, process_count)

    def batch(self, index: int) -> dict:
        sel = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return collate(self.data, self.rows[sel][self._host], self.seq_len, self.valid[sel][self._host])


def _row_key(domain: int, k: int) -> np.ndarray:
    """Packed row k of `domain` as an element of the mixed stream (resolved by TrainBatches.global_rows)."""
    return np.asarray([domain, k], np.int64)


def eval_batches(data: TokenizedSplit, cfg: DataConfig, *, process_index: int = 0, process_count: int = 1,
                 batch_size: Optional[int] = None) -> grain.MapDataset:
    """One deterministic pass over every example of `data` (domain by domain, in row order) as fixed-size batches
    of this host's rows; the last global batch is padded with rows whose `valid` is 0. Re-iterable."""
    bsz = batch_size or cfg.eval_batch
    host = _host_slice(bsz, process_index, process_count)
    n = len(data)
    lengths = data.lengths

    def make(i: int) -> dict:
        rows = np.arange(i * bsz, (i + 1) * bsz)
        valid = rows < n
        rows = np.where(valid, rows, 0)  # padding rows repeat row 0, masked out by `valid`
        seq_len = bucket_for(int(lengths[rows[valid]].max()), cfg.buckets)
        return collate(data, rows[host], seq_len, valid[host])

    return grain.MapDataset.range(-(-n // bsz)).map(make)
