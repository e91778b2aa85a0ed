"""Compact LM targets on the host: the positions whose next token is a loss target, left-aligned in a few fixed
widths, so the LM head runs on K target positions instead of all T (moa_jax/nn/lm_loss.py).

Shape glossary: T tokens per row, K target columns (T times one of `buckets`).
"""
from __future__ import annotations

import numpy as np


def gather_targets(tokens: np.ndarray, loss_mask: np.ndarray, buckets=(0.25, 0.5, 1.0), at_least: int = 0):
    """Host-side compact form: only the positions whose next token is a target, left-aligned in K columns, K the
    smallest of T*buckets that fits every row and `at_least` (a few fixed shapes; several hosts pass the global
    maximum so they agree). tokens/loss_mask [..., T] -> target_pos, target_tokens, target_weight [..., K]."""
    lead, t = tokens.shape[:-1], tokens.shape[-1]
    tok2, m2 = tokens.reshape(-1, t), loss_mask.reshape(-1, t)
    need = max(int(m2[:, 1:].sum(axis=1).max(initial=0)), at_least)
    k = next(int(np.ceil(t * f)) for f in buckets if np.ceil(t * f) >= need)
    k = max(k, 1)
    pos = np.zeros((len(tok2), k), np.int32)
    tgt = np.zeros((len(tok2), k), np.int32)
    wgt = np.zeros((len(tok2), k), np.int32)
    for i in range(len(tok2)):
        p = np.flatnonzero(m2[i, 1:])                   # logits at p predict token p + 1
        pos[i, :len(p)], tgt[i, :len(p)], wgt[i, :len(p)] = p, tok2[i, p + 1], 1
    return pos.reshape(*lead, k), tgt.reshape(*lead, k), wgt.reshape(*lead, k)
