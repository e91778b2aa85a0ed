"""Replay one stage-1 expert of an experiment alone, on exactly the rows it sees, to study its loss curve.

    python -m benchmarks.studies.replay_expert --exp moa_10task_accel --domain letter_counting --steps 800 \
        [--dtype bfloat16] [--b2 0.999] [--lr 5e-4] [--probe] --out replay.jsonl

Stage 1 trains the experts independently: label routing, each domain's mean token loss, gradients clipped per
expert, AdamW per coordinate. So expert d's trajectory depends only on the rows of domain d in each global batch
and on the schedule. This rebuilds the experiment's global batches (same seed, batch size, mixing), keeps domain
d's rows of batch s (padded with invalid rows to an even count, or to --rows, at the smallest bucket that fits the
domain's rows), and trains one expert (E = 1) with the experiment's stage-1 optimiser and schedule, or with another
Adam b2 / peak learning rate to test a fix. One JSON line per step: step, loss (the domain's mean token loss),
grad_norm (before clipping), rows (the domain's real rows in the global batch). `--probe` then examines the next
batch (probe_next): whether its loss is the parameters' doing or the compute dtype's, and which tokens carry it.

Differences from the full run, by construction: the padded length (the full run pads to the longest row of the
whole global batch) and the dropout bits (drawn per row position). A loss spike that this replay does not show
comes from something else than the rows and the schedule (e.g. the compute dtype: try --dtype bfloat16).

Shape glossary: B rows of the replayed batch, T tokens.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.registry import get_experiment
from moa_jax.config import replace
from moa_jax.data.packing import collate_packed
from moa_jax.data.pipeline import TrainBatches, bucket_for, collate, load_split
from moa_jax.loading.base import default_dtype, load_base_model
from moa_jax.nn.model import MoATransformer
from moa_jax.params import init_trainable, merge_params
from moa_jax.nn.entry import ModelInputs, forward
from moa_jax.train.step import init_state, make_optimizer, train_step


def replay(exp_name: str, domain: str, steps: int, *, dtype=None, b2=None, lr=None, rows: int = 0,
           out=None, log_every: int = 50, probe: bool = False) -> list[dict]:
    """Replay `steps` updates (module docstring) -> one dict per step; with `probe` a last dict from probe_next."""
    exp = get_experiment(exp_name)
    changes = {k: v for k, v in (("learning_rate", lr), ("adam_b2", b2)) if v is not None}
    tcfg = replace(exp.stage1, **changes)
    cfg, frozen, tokenizer = load_base_model(exp.model, default_dtype(dtype or exp.dtype))
    data = load_split(exp.data, tokenizer, "train")
    if domain not in data.domains:
        raise SystemExit(f"error: domain {domain!r} not in {list(data.domains)}")
    d = data.domains.index(domain)
    batches = TrainBatches(data, exp.data)
    moa = replace(exp.moa, num_experts=1)
    model = MoATransformer(cfg, moa)
    trainable = init_trainable(cfg, moa, jax.random.PRNGKey(tcfg.seed))
    tx = make_optimizer(tcfg, trainable)
    state = init_state(trainable, tx, tcfg.seed)
    step_fn = jax.jit(functools.partial(train_step, model=model, tcfg=tcfg, tx=tx, num_domains=1),
                      donate_argnums=(0,))
    packed = exp.data.packing != "none"
    seq_len = (exp.data.buckets[-1] if packed else
               bucket_for(int(data.lengths[data.domain_rows(d)].max()), exp.data.buckets))

    def make_batch(s: int):
        """Global batch s's rows of the domain as one micro-batch -> (batch, real rows)."""
        mine = [g for g in batches.global_rows(s) if data.domain[g[0]] == d]
        # only the domain's rows are computed: rounded up to an even count (one program per count), or --rows
        size = rows or 2 * ((len(mine) + 1) // 2) or 2
        if len(mine) > size:
            raise SystemExit(f"error: global batch {s} holds {len(mine)} rows of {domain}; pass --rows {len(mine)} "
                             "or more (or 0: as many as each batch holds)")
        valid = np.arange(size) < len(mine)
        padded = mine + [data.domain_rows(d)[:1]] * (size - len(mine))   # filler rows, valid 0: no loss
        if packed:
            batch = collate_packed(data, padded, seq_len, exp.data.max_segments)
            batch["valid"] = valid.astype(np.int32)
        else:
            batch = collate(data, np.concatenate(padded), seq_len, valid)
        batch["domain"] = np.zeros(size, np.int32)
        return {k: jnp.asarray(v)[None] for k, v in batch.items() if k != "index"}, len(mine)   # one micro-batch

    history, t0 = [], time.perf_counter()
    for s in range(steps):
        batch, n = make_batch(s)
        state, m = step_fn(state, frozen, batch)
        m = jax.device_get(m)
        row = {"step": s + 1, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "rows": int(n)}
        history.append(row)
        if out is not None:
            out.write(json.dumps(row) + "\n")
            out.flush()
        if (s + 1) % log_every == 0:
            print(f"step {s + 1}: loss {row['loss']:.3f} grad_norm {row['grad_norm']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if probe:
        history.append(probe_next(exp, tcfg, cfg, moa, tx, state, frozen, make_batch, steps, tokenizer))
        print(json.dumps(history[-1]), flush=True)
        if out is not None:
            out.write(json.dumps(history[-1]) + "\n")
    return history


def probe_next(exp, tcfg, cfg, moa, tx, state, frozen, make_batch, steps: int, tokenizer) -> dict:
    """With the state after `steps` updates: the next batch's loss and gradient norm (no update) in the run's
    compute dtype with and without dropout and in float32; and per token of the last and the next batch, the NLL
    of the target and the three most likely tokens (float32, no dropout). Tells a spike that comes from the
    arithmetic from one that comes from the parameters."""
    out = {"probe_step": steps + 1, "loss": {}}
    cfg32, frozen32, _ = load_base_model(exp.model, "float32")
    batch, _ = make_batch(steps)
    runs = {"run dtype": (frozen, cfg, moa), "run dtype, no dropout": (frozen, cfg, replace(moa, dropout=0.0)),
            "float32": (frozen32, cfg32, moa)}
    for name, (params, model_cfg, m_cfg) in runs.items():
        model = MoATransformer(model_cfg, m_cfg)
        fn = jax.jit(functools.partial(train_step, model=model, tcfg=tcfg, tx=tx, num_domains=1))
        _, m = fn(state, params, batch)
        out["loss"][name] = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}
    model = MoATransformer(cfg32, replace(moa, dropout=0.0))
    params = merge_params(frozen32, state.trainable)
    out["tokens"] = {}
    for s in (steps - 1, steps) if steps else (steps,):   # no last batch before the first update
        b = {k: v[0] for k, v in make_batch(s)[0].items()}
        # right_padded=False: the attention path the recorded probes used
        logits, _ = forward(model, params, ModelInputs.of(b)._replace(right_padded=False), mode="fixed",
                            expert_idx=b["domain"])
        logp = np.asarray(jax.nn.log_softmax(logits, -1))
        rows = []
        for i in np.flatnonzero(np.asarray(b["valid"])):
            for p in np.flatnonzero(np.asarray(b["loss_mask"][i])):
                target, lp = int(b["tokens"][i, p]), logp[i, p - 1]
                rows.append({"row": int(i), "target": tokenizer.decode([target]), "nll": round(float(-lp[target]), 3),
                             "top": [[tokenizer.decode([int(k)]), round(float(np.exp(lp[k])), 3)]
                                     for k in np.argsort(-lp)[:3]]})
        out["tokens"][f"batch {s + 1}"] = rows
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exp", default="moa_10task_accel", help="experiment preset whose stage 1 is replayed")
    ap.add_argument("--domain", default="letter_counting", help="the domain (expert) to replay")
    ap.add_argument("--steps", type=int, default=800, help="global batches to replay")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the experiment's, else per backend)")
    ap.add_argument("--b2", type=float, default=None, help="Adam second-moment decay (default: the experiment's "
                                                          "stage1.adam_b2)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the experiment's)")
    ap.add_argument("--rows", type=int, default=0,
                    help="rows per replayed batch (the domain's rows + padding); 0: the domain's rows rounded up to "
                         "an even count (one compiled program per count)")
    ap.add_argument("--out", default=None, help="JSONL file, one line per step")
    ap.add_argument("--probe", action="store_true",
                    help="after the last step, probe the next batch: its loss in the run dtype with and without "
                         "dropout and in float32, and per-token NLLs of the last and the next batch (one JSON line)")
    args = ap.parse_args(argv)
    if args.steps < 0:
        ap.error(f"--steps must be >= 0, got {args.steps}")
    out = open(args.out, "w") if args.out else None
    try:
        replay(args.exp, args.domain, args.steps, dtype=args.dtype, b2=args.b2, lr=args.lr, rows=args.rows, out=out,
               probe=args.probe)
    finally:
        if out is not None:
            out.close()


if __name__ == "__main__":
    main()
