"""A token stream as text: one prompt's decoding (decode.generate_tokens with `on_token`) turned into a generator
of text pieces, each the new suffix of the decoded answer, yielded as its tokens are decoded.

    for piece in stream_text(run, tokenizer, eos):   # run(on_token) decodes; decode.py calls on_token per step
        print(piece.text, end="", flush=True)         # piece.expert: the expert answering; piece.token_ids: its tokens

Detokenisation is incremental over the whole answer so far (`TextStream`): a byte-level BPE or SentencePiece
byte-fallback token can be part of one multi-byte UTF-8 character, and a SentencePiece word piece decodes
differently at the start of a sequence than after another token, so pieces are suffixes of decode(all ids so
far), held back while that text ends in an incomplete character (U+FFFD) and released with the next token that
completes it. The pieces concatenate to decode(answer ids), generate's text, for every tokenizer whose decode of
a prefix of the ids is a prefix of the decode of all of them (byte-level BPE and SentencePiece are; WordPiece's
clean-up of spaces before punctuation is not, and text it rewrites after it was given out is lost); an incomplete
character that never completes is released at the end as decode gives it. A stream has at least one piece, so
the expert is known even for an empty answer. Each token re-decodes the answer so far: linear in its length,
about a millisecond per token at 2,000 tokens with SmolLM2's tokenizer on a loaded CPU.

The decode program runs in a worker thread (its host callback fills a queue this generator reads); leaving the
loop early (break, close, an exception) tells the program to stop after its current step and waits for it.

Shape glossary: B batch (1 here), N new tokens.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

_END = object()   # the worker's last queue item: (_END, exception or None)


@dataclasses.dataclass(frozen=True)
class TextPiece:
    text: str            # new text of the answer (pieces concatenate to the whole answer)
    expert: int          # the expert answering this prompt (-1: base model / token-level routing)
    token_ids: tuple     # the tokens decoded since the previous piece (they concatenate to the answer's ids)


class TextStream:
    """Incremental detokenisation of one answer: add(token id) -> the text it completes ('' while held back)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""          # the text given out so far: always a prefix of decode(self.ids) when given

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""           # an incomplete character, or a decode that rewrote earlier text: wait
        piece, self.sent = text[len(self.sent):], text
        return piece

    def flush(self) -> str:
        """What is left at the end of the answer (a held back sequence that never completed, as decode gives it)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += piece
        return piece


def token_events(run: Callable[[Callable], object]) -> Iterator[tuple]:
    """run(on_token) in a worker thread -> the (step, tokens [B], experts [B]) of each on_token call, in order.
    Closing the generator makes on_token answer True (stop) and waits for `run` to return."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def on_token(step, tokens, experts) -> bool:
        events.put((step, tokens, experts))
        return stop.is_set()

    def work():
        try:
            run(on_token)
            events.put((_END, None))
        except BaseException as e:   # noqa: B036 (handed to the reading thread, re-raised there)
            events.put((_END, e))

    worker = threading.Thread(target=work, name="moa_jax-decode-stream", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            if event[0] is _END:
                if event[1] is not None:
                    raise event[1]
                return
            yield event
    finally:
        stop.set()
        worker.join()


def stream_text(run: Callable[[Callable], object], tokenizer, eos: Sequence[int]) -> Iterator[TextPiece]:
    """One prompt's decoding `run(on_token)` -> its answer as TextPieces, up to (not including) the first EOS."""
    text, held, expert, stop, pieces = TextStream(tokenizer), [], -1, set(eos), 0
    events = token_events(run)
    try:
        for _, tokens, experts in events:
            tok, expert = int(np.asarray(tokens)[0]), int(np.asarray(experts)[0])
            if tok in stop:
                break
            held.append(tok)
            piece = text.add(tok)
            if piece:
                yield TextPiece(piece, expert, tuple(held))
                held, pieces = [], pieces + 1
    finally:
        events.close()
    rest = text.flush()
    if rest or held or not pieces:
        yield TextPiece(rest, expert, tuple(held))
