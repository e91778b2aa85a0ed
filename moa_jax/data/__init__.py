"""Data for MoA: the embedded 10-domain dataset, your own JSONL / tfds data, chat-template tokenisation and the
deterministic domain-balanced batch pipeline. See docs/data.md.

    data = load_split(cfg, tokenizer, "train")                # TokenizedSplit (+ .report of lengths)
    batches = TrainBatches(data, cfg, process_index=jax.process_index(), process_count=jax.process_count())
    batch = batches.batch(s)                                  # global batch s, this host's rows (resume: same s)
    for batch in eval_batches(load_split(cfg, tokenizer, "validation"), cfg): ...
    batches = collate_rows(data, rows, batch_size, cfg.buckets)  # chosen rows, in order, last batch padded
"""
from moa_jax.config import DataConfig
from moa_jax.data.jsonl_records import parse_record
from moa_jax.data.pipeline import (TrainBatches, bucket_for, collate, collate_rows, domain_weights, eval_batches,
                                   load_split)
from moa_jax.data.sources import TextSplit, load_text_split
from moa_jax.data.tasks import (DOMAIN_NAMES, DOMAINS, TASK_SYSTEM_PROMPT, DataError, extract_answer, is_correct,
                                score)
from moa_jax.data.tokenize import LengthReport, TokenizedSplit, tokenize_split

__all__ = [
    "DOMAINS", "DOMAIN_NAMES", "DataConfig", "DataError", "LengthReport", "TASK_SYSTEM_PROMPT", "TextSplit",
    "TokenizedSplit", "TrainBatches", "bucket_for", "collate", "collate_rows", "domain_weights", "eval_batches",
    "extract_answer", "is_correct", "load_split", "load_text_split", "parse_record", "score", "tokenize_split",
]
