"""Tokenisation: the prompt in DataConfig.prompt_format (chat template with the generation cue, or plain text;
moa_jax/data/prompt_format.py), then response + eos. The whole split is tokenised once up front (batched, in the
Rust tokenizer) and stored ragged.

Per example we keep the token ids and the prompt length P; batches derive the masks from them (pipeline.collate):
  tokens          [P prompt tokens | R response tokens | eos]                  length L = P + R + 1
  loss_mask       1 on the response tokens and the eos = the tokens to PREDICT (the trainer compares
                  logits[:, :-1] with tokens[:, 1:] weighted by loss_mask[:, 1:])
  prompt_mask     1 on the P prompt tokens (router pooling); 0 on response and padding
  attention_mask  1 on the L real tokens
Shape glossary: N examples, L tokens of one example, D domains.

Max-length policy (DataConfig.length_policy), for examples with L > max_len, never silent:
  drop (default)  the example is left out; counted per domain in the LengthReport, which is logged (WARNING) and
                  returned. Dropping keeps every kept example exactly as the model will see it at inference.
  truncate_left   prompt tokens are cut from the left (the response and eos are kept whole); if the response
                  alone does not fit the example is dropped. Counted in the report as truncated / dropped.
  error           raise a DataError naming the count per domain.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np

from moa_jax.data.prompt_format import conversation, prompt_ids, resolve_prompt_format
from moa_jax.data.sources import TextSplit
from moa_jax.data.tasks import DataError

log = logging.getLogger("moa_jax.data")


@dataclasses.dataclass
class LengthReport:
    """Token-length statistics of one tokenised split and what the max-length policy did, per domain."""
    split: str
    max_len: int
    policy: str
    rows: dict[str, dict]  # domain -> {total, kept, over_long, truncated, dropped, mean_len, p95_len, max_len}

    @property
    def over_long(self) -> int:
        return sum(r["over_long"] for r in self.rows.values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        head = (f"{self.split}: max_len={self.max_len} policy={self.policy}\n"
                f"{'domain':<24}{'total':>7}{'kept':>7}{'over':>6}{'trunc':>6}{'drop':>6}{'mean':>7}{'p95':>6}"
                f"{'max':>6}")
        lines = [f"{d:<24}{r['total']:>7}{r['kept']:>7}{r['over_long']:>6}{r['truncated']:>6}{r['dropped']:>6}"
                 f"{r['mean_len']:>7.1f}{r['p95_len']:>6}{r['max_len']:>6}" for d, r in self.rows.items()]
        return "\n".join([head] + lines)


@dataclasses.dataclass
class TokenizedSplit:
    """A tokenised split, ragged: example i is flat[offsets[i]:offsets[i+1]], its first prompt_len[i] tokens are the
    prompt. Examples are grouped by domain (domain-sorted); `source_index` points back into TextSplit.examples."""
    name: str
    domains: tuple[str, ...]      # D; position = domain id = expert id
    flat: np.ndarray              # int32 [sum L]
    offsets: np.ndarray           # int64 [N+1]
    prompt_len: np.ndarray        # int32 [N]
    domain: np.ndarray            # int32 [N]
    source_index: np.ndarray      # int32 [N] index within its domain's TextSplit list
    pad_id: int
    report: LengthReport
    text: Optional[TextSplit] = None  # the raw examples (references, metadata) for generation-based evaluation

    def __len__(self) -> int:
        return len(self.prompt_len)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def tokens(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def domain_rows(self, d: int) -> np.ndarray:
        """Row ids of domain d (contiguous, ascending)."""
        return np.flatnonzero(self.domain == d)

    def example(self, i: int) -> dict:
        """The raw text example behind row i (needs `text`)."""
        return self.text.examples[self.domains[self.domain[i]]][self.source_index[i]]


def tokenize_split(text: TextSplit, tokenizer, *, max_len: int, policy: str = "drop",
                   system_prompt: Optional[str] = None, prompt_format: str = "auto") -> TokenizedSplit:
    """Tokenises every example of `text` with `tokenizer` (a transformers tokenizer).
    system_prompt: the system message to add (None: none), i.e. DataConfig.system_prompt already resolved with
    sources.resolve_system_prompt; prompt_format: DataConfig.prompt_format ("auto" resolves with the tokenizer)."""
    if system_prompt == "auto":
        raise ValueError('tokenize_split(system_prompt="auto"): resolve the setting first with '
                         'moa_jax.data.sources.resolve_system_prompt(setting, source)')
    prompt_format = resolve_prompt_format(prompt_format, tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id: the response must end with an end-of-turn token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    seqs, plens, doms, srcs, rows = [], [], [], [], {}
    for d, name in enumerate(text.domains):
        exs = text.examples[name]
        # The format writes its own special tokens (bos, turn markers): never added again.
        p_ids = prompt_ids(tokenizer, [conversation(e, system_prompt) for e in exs], prompt_format)
        r_ids = tokenizer([e["response"] for e in exs], add_special_tokens=False)["input_ids"]
        lens, over, trunc, drop = [], 0, 0, 0
        for j, (p, r) in enumerate(zip(p_ids, r_ids)):
            ids = p + r + [eos]
            lens.append(len(ids))
            plen = len(p)
            if len(ids) > max_len:
                over += 1
                if policy == "truncate_left" and len(r) + 2 <= max_len:  # keep >= 1 prompt token
                    cut = len(ids) - max_len
                    ids, plen = ids[cut:], plen - cut
                    trunc += 1
                else:
                    drop += 1
                    continue
            seqs.append(np.asarray(ids, np.int32))
            plens.append(plen)
            doms.append(d)
            srcs.append(j)
        lens = np.asarray(lens or [0])
        rows[name] = dict(total=len(exs), kept=len(exs) - drop, over_long=over, truncated=trunc, dropped=drop,
                          mean_len=round(float(lens.mean()), 1), p95_len=int(np.percentile(lens, 95)),
                          max_len=int(lens.max()))
    report = LengthReport(text.name, max_len, policy, rows)
    if report.over_long:
        if policy == "error":
            raise DataError(f"{text.name}: examples longer than max_len={max_len}: "
                            f"{ {d: r['over_long'] for d, r in rows.items() if r['over_long']} } "
                            f"(raise DataConfig.max_len or choose length_policy='drop'/'truncate_left')\n{report}")
        log.warning("%s: %d example(s) longer than max_len=%d (policy %s)\n%s", text.name, report.over_long,
                    max_len, policy, report)
    else:
        log.info("%s\n%s", text.name, report)
    empty = [d for d, r in rows.items() if r["kept"] == 0]
    if empty:
        raise DataError(f"{text.name}: every example of domain(s) {empty} is longer than max_len={max_len}\n{report}")
    lengths = np.array([len(s) for s in seqs], np.int64)
    return TokenizedSplit(
        name=text.name, domains=text.domains,
        flat=np.concatenate(seqs).astype(np.int32), offsets=np.concatenate([[0], np.cumsum(lengths)]),
        prompt_len=np.asarray(plens, np.int32), domain=np.asarray(doms, np.int32),
        source_index=np.asarray(srcs, np.int32), pad_id=int(pad), report=report, text=text)
