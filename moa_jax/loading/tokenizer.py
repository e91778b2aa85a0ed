"""Tokenizers for any model source: Hugging Face directories, or the BPE embedded in a GGUF file.

    tok = load_tokenizer("smollm2-135m-instruct")     # transformers.PreTrainedTokenizerFast
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)

A GGUF file has no tokenizer.json; it stores llama.cpp metadata instead (`tokenizer.ggml.tokens`, `.merges`,
`.token_type`, special-token ids, `tokenizer.chat_template`). For byte-level BPE files (`tokenizer.ggml.model ==
"gpt2"`) we rebuild the tokenizer with the `tokenizers` library the way transformers' own GGUF path does
(`integrations/gguf/gguf_tokenizer_mapping.py`), and a test checks the ids are identical:
  * vocabulary and merges as stored; a token spelled outside the GPT-2 byte alphabet is respelled byte-wise;
  * tokens typed CONTROL (3) become special added tokens (matched whole, skipped by decode), USER_DEFINED (4)
    plain added tokens;
  * pre-tokenizer: the split regex named by `tokenizer.ggml.pre` for the families listed below, otherwise
    GPT-2's byte-level regex (SmolLM2's "smollm" uses GPT-2's).
SentencePiece files (`tokenizer.ggml.model == "llama"`: Gemma, Llama 2, Mistral) go through transformers' own GGUF
tokenizer converter (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): a SentencePiece-BPE vocabulary stores no
merges, and recovering them (for Gemma from the token order, not the scores) is that converter's job; rebuilding
it here would be a second implementation to keep equal. The file's `tokenizer.chat_template`, if any, comes along;
a base model without one (Gemma 3 270M) gets none.
If a model defines no pad token, pad = eos: padded positions are masked out of the loss and attention anyway, and
the eos embedding is a trained row (an unused id could be an untrained one).

Shape glossary: T tokens, V vocab.
"""
from __future__ import annotations

import logging
import os

from moa_jax.loading.gguf import gguf_field, open_gguf
from moa_jax.loading.resolve import GGUF, CheckpointError, ModelSourceError, resolve_source

log = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` -> split regex (copied from transformers' GGUF table for the families we load).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_GPT2_STYLE = (None, "default", "gpt2", "gpt-2", "smollm", "starcoder", "refact", "olmo")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def gguf_tokenizer(path: str, reader=None):
    """A PreTrainedTokenizerFast rebuilt from a GGUF file's byte-level BPE metadata, or for a SentencePiece file
    transformers' own GGUF tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = reader if reader is not None else open_gguf(path)
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_tokenizer(path)
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (supported: 'gpt2' byte-level "
                              f"BPE, 'llama' SentencePiece); use the model's Hugging Face tokenizer directory instead")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    merges = gguf_field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{path}: GGUF has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    types = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens stored as raw text (outside the byte alphabet) are respelled byte-wise, as transformers does.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend = Tokenizer(bpe)
    pre = gguf_field(reader, "tokenizer.ggml.pre")
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _GPT2_STYLE:
            log.warning("%s: unknown tokenizer.ggml.pre=%r; using GPT-2's pre-tokenizer regex", path, pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # A CONTROL token spelled outside the byte alphabet is a llama.cpp mislabel (transformers skips it too).
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    def special(key):
        index = gguf_field(reader, f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=gguf_field(reader, "tokenizer.chat_template"),
        bos_token=special("bos_token_id"), eos_token=special("eos_token_id"), unk_token=special("unknown_token_id"),
        pad_token=special("padding_token_id"),
        add_bos_token=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False)))


# Any one of these makes a Hugging Face directory's tokenizer loadable (tokenizer.json, SentencePiece's
# tokenizer.model, or GPT-2's vocab.json + merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class MissingTokenizerError(ModelSourceError):
    """A model source holds weights but no tokenizer."""


def _sentencepiece_tokenizer(path: str):
    """A SentencePiece GGUF's tokenizer through transformers' GGUF converter (module docstring)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except (ValueError, KeyError) as e:   # metadata the converter cannot use
        raise CheckpointError(f"{path}: cannot build its SentencePiece tokenizer: {e}") from e


def load_tokenizer(source: str, *, required: bool = True):
    """transformers.PreTrainedTokenizerFast for a model name, a .gguf file, a Hugging Face directory or Hub id
    (whose weight files are not fetched for this). A Hugging Face directory without tokenizer files: a
    MissingTokenizerError naming them, or None with required=False (the model still computes logits)."""
    kind, path = resolve_source(source, weights=False)
    if kind == GGUF:
        tok = gguf_tokenizer(path)
    else:
        if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            if not required:
                log.warning("%s has no tokenizer (none of %s): loaded for logits only", path, list(TOKENIZER_FILES))
                return None
            raise MissingTokenizerError(f"{path} has no tokenizer (none of {list(TOKENIZER_FILES)}): save the "
                                        f"tokenizer into it (tokenizer.save_pretrained(dir)) or pass token ids")
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # see the module docstring
    return tok
