"""Look at a data source: per-domain counts, token-length statistics and a few rendered examples.

    python -m moa_jax.data.inspect                                  # embedded moa_tasks, default config, train
    python -m moa_jax.data.inspect --source jsonl:/data/mytasks --split validation --examples 1
    python -m moa_jax.data.inspect --config tiny --tokenizer /path/to/hf_model_dir --max-len 128
    python -m moa_jax.data.inspect --max-len 128 --pack-len 128 --examples 0   # what packing='domain' gives
    python -m moa_jax.data.inspect --tokenizer gemma3-270m --prompt-format plain   # a base model without a template

Tokenizer: "smollm2-135m-instruct" (default: the embedded GGUF), a Hugging Face model directory or hub name, or
"none" (counts and character lengths only). Rendered examples mark the loss tokens: the prompt as the model sees
it, then the response between [[ ]] (loss_mask = 1: response + eos). JSONL lines that carry their own "domain"
get a domain table (lines and source files per domain) and a WARNING for a domain that looks like a typo.
A data, config or tokenizer mistake is one `error:` line and exit code 2.
Shape glossary: N examples per domain.
"""
from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from moa_jax.config import DataConfig
from moa_jax.data.packing import packing_report
from moa_jax.data.prompt_format import PROMPT_FORMATS, resolve_prompt_format
from moa_jax.data.sources import load_text_split, resolve_system_prompt
from moa_jax.data.tasks import DataError
from moa_jax.data.tokenize import tokenize_split
from moa_jax.errors import cli_main


def load_tokenizer(name: str):
    """--tokenizer: a model name or path as moa_jax.load_model takes it, or "none" (no tokenisation)."""
    if name == "none":
        return None
    from moa_jax.loading import load_tokenizer as library_loader   # deferred: only when tokenising
    return library_loader(name)


def main(argv=None) -> int:
    return cli_main(_main, argv)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moa_jax.data.inspect", description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="moa_tasks", help="moa_tasks | jsonl:DIR | tfds:NAME | hf:NAME[:CONFIG]")
    ap.add_argument("--config", default="default", help="moa_tasks builder config (default|small|tiny)")
    ap.add_argument("--data-dir", default=None, help="tfds data directory (default: tfds's own)")
    ap.add_argument("--field-map", default="", help="tfds and hf sources: prompt=F,response=F[,domain=F]")
    ap.add_argument("--split", default="train", choices=("train", "validation", "test"), help="split to inspect")
    ap.add_argument("--domains", default="", help="comma-separated subset")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct",
                    help='the embedded "smollm2-135m-instruct" (default), a Hugging Face model directory, or "none"')
    ap.add_argument("--system-prompt", default="auto", help='"auto", "none" or the text')
    ap.add_argument("--prompt-format", default="auto", choices=PROMPT_FORMATS,
                    help="chat (the tokenizer's chat template), plain (text only: base models without a template) "
                         "or auto (chat when the tokenizer has a template); data.prompt_format of a run")
    ap.add_argument("--max-len", type=int, default=256, help="token budget per example (default 256; the length policy applies above it)")
    ap.add_argument("--examples", type=int, default=2, help="rendered examples per domain")
    ap.add_argument("--pack-len", type=int, default=0,
                    help="also report same-domain packing (DataConfig.packing='domain') into rows of N tokens")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.pack_len and args.pack_len < args.max_len:
        raise DataError(f"--pack-len {args.pack_len} is shorter than --max-len {args.max_len}: a packed row must "
                        f"hold the longest example; use --pack-len >= --max-len")

    cfg = DataConfig(source=args.source, builder_config=args.config, data_dir=args.data_dir,
                     field_map=args.field_map, domains=tuple(d for d in args.domains.split(",") if d),
                     system_prompt=None if args.system_prompt == "none" else args.system_prompt,
                     max_len=args.max_len, buckets=tuple(sorted({64, 128, 256, args.max_len})),
                     prompt_format=args.prompt_format)
    text = load_text_split(cfg, args.split)
    print(f"{text.name}: {sum(text.counts().values())} examples in {len(text.domains)} domains")
    if text.census is not None and text.census.line_level:
        print(text.census.table())
        for warning in text.census.warnings():
            print(f"WARNING: {warning}")
    tok = load_tokenizer(args.tokenizer)
    if tok is None:
        print(f"{'domain':<24}{'N':>7}{'prompt chars':>14}{'response chars':>16}")
        for d in text.domains:
            exs = text.examples[d]
            p = np.mean([sum(len(m["content"]) for m in e["messages"]) for e in exs])
            r = np.mean([len(e["response"]) for e in exs])
            print(f"{d:<24}{len(exs):>7}{p:>14.1f}{r:>16.1f}")
        return 0
    system = resolve_system_prompt(cfg.system_prompt, cfg.source)
    data = tokenize_split(text, tok, max_len=cfg.max_len, policy=cfg.length_policy, system_prompt=system,
                          prompt_format=cfg.prompt_format)
    print(f"system prompt: {system!r}; prompt format: {resolve_prompt_format(cfg.prompt_format, tok)}")
    print(data.report)
    if args.pack_len:
        print(packing_report(data, args.pack_len))
    for d, name in enumerate(data.domains):
        for i in data.domain_rows(d)[:args.examples]:
            ids, p = data.tokens(i), int(data.prompt_len[i])
            print(f"\n--- {name} #{data.source_index[i]} ({len(ids)} tokens, {p} prompt) ---")
            print(tok.decode(ids[:p]) + "[[" + tok.decode(ids[p:]) + "]]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
