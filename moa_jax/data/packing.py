"""Same-domain sequence packing of training rows (DataConfig.packing='domain').

A packed row holds consecutive examples of ONE domain's shuffled stream, one after another, each a segment:
next-fit in stream order up to the largest bucket of tokens and `DataConfig.max_segments` segments, so every
example of the stream lands in exactly one row, in order, and an epoch is still every example once. Because a row
is one domain, the per-sequence top-1 dispatch (one expert per row, label routing) stays exact; attention stays
inside each segment, positions restart at every segment, and the routers pool each segment's prompt on its own
(per-segment routing: what each prompt gets at inference, where it is a sequence of its own). Without packing a
batch is padded to its longest row; on the embedded data (mean 64 tokens, word_sorting 115) that is about half
padding at T=128.

Mixing stays per EXAMPLE: a domain whose rows hold k examples on average (measured on its first epoch) gets its
mixing weight / k of the rows, so each domain contributes the share of examples it has without packing.

Extra batch keys (moa_jax/data/pipeline.py has the others; `domain` is the row's domain, `index` its first row):
  segment_ids int32 [b, T]: 1..G for the row's segments in order, 0 on padding;
  segment_valid int32 [b, G]: 1 where the row has segment g.

Shape glossary: b rows on this host, T tokens, G segments per row (DataConfig.max_segments), n examples.
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

from moa_jax.data.tokenize import TokenizedSplit


class PackedRows:
    """k -> the example ids [n] of the k-th packed row of one domain's infinite example stream `stream`
    (stream(i) = the i-th example id). Pure in k; row starts are computed in order once and cached, so a resumed
    run asks for row k directly."""

    def __init__(self, stream: Callable[[int], int], lengths: np.ndarray, capacity: int, max_segments: int):
        self._stream, self._lengths = stream, lengths
        self.capacity, self.max_segments = capacity, max_segments
        self._starts = [0]          # stream index where row k starts
        self._lock = threading.Lock()  # grain may ask from its reader thread

    def _extend(self, rows: int) -> None:
        while len(self._starts) <= rows:
            i, used = self._starts[-1], 0
            for n in range(self.max_segments):
                length = int(self._lengths[self._stream(i)])
                if n and used + length > self.capacity:
                    break
                used, i = used + length, i + 1
            self._starts.append(i)

    def __call__(self, k: int) -> np.ndarray:
        k = int(k)
        with self._lock:
            self._extend(k + 1)
            start, stop = self._starts[k], self._starts[k + 1]
        return np.asarray([self._stream(i) for i in range(start, stop)], np.int64)

    def mean_examples_per_row(self, examples: int) -> float:
        """Examples per row over the first `examples` of the stream (one epoch: the domain's size)."""
        with self._lock:
            while self._starts[-1] < examples:
                self._extend(len(self._starts))
            rows = next(k for k, s in enumerate(self._starts) if s >= examples)
        return examples / max(rows, 1)


def collate_packed(data: TokenizedSplit, groups: Sequence[np.ndarray], seq_len: int, max_segments: int) -> dict:
    """Right-padded batch of packed rows (one array of example ids per row) at length `seq_len` (T)."""
    b = len(groups)
    tokens = np.full((b, seq_len), data.pad_id, np.int32)
    loss_mask, prompt_mask, attention_mask, segment_ids = (np.zeros((b, seq_len), np.int32) for _ in range(4))
    segment_valid = np.zeros((b, max_segments), np.int32)
    for i, group in enumerate(groups):
        offset = 0
        for g, r in enumerate(group):
            ids, p = data.tokens(r), int(data.prompt_len[r])
            end = offset + len(ids)
            tokens[i, offset:end] = ids
            attention_mask[i, offset:end] = 1
            segment_ids[i, offset:end] = g + 1
            prompt_mask[i, offset:offset + p] = 1
            loss_mask[i, offset + p:end] = 1  # response tokens and the final eos
            offset = end
        segment_valid[i, :len(group)] = 1
    first = np.asarray([group[0] for group in groups], np.int64)
    return dict(tokens=tokens, loss_mask=loss_mask, prompt_mask=prompt_mask, attention_mask=attention_mask,
                segment_ids=segment_ids, segment_valid=segment_valid,
                domain=data.domain[first].astype(np.int32), index=first.astype(np.int32))


def packing_report(data: TokenizedSplit, capacity: int, max_segments: int = 8) -> str:
    """Per domain: examples per packed row and the share of real tokens in rows of `capacity` tokens, one epoch
    in storage order (what `python -m moa_jax.data.inspect --pack-len N` prints, to size a packed budget)."""
    lines = [f"packing='domain' at {capacity} tokens, at most {max_segments} per row:",
             f"{'domain':<24}{'examples/row':>14}{'real tokens':>13}"]
    per_row = []
    for d, name in enumerate(data.domains):
        rows = data.domain_rows(d)
        if not len(rows):
            continue
        packer = PackedRows(lambda i, rows=rows: int(rows[i % len(rows)]), data.lengths, capacity, max_segments)
        k = packer.mean_examples_per_row(len(rows))
        per_row.append(k)
        real = float(data.lengths[rows].mean()) * k / capacity
        lines.append(f"{name:<24}{k:>14.2f}{real:>13.0%}")
    if per_row:   # uniform mixing of examples: rows per domain ~ 1/k
        lines.append(f"{'all (uniform mixing)':<24}{len(per_row) / np.sum(1.0 / np.asarray(per_row)):>14.2f}")
    return "\n".join(lines)
