"""int8 base vs float on the embedded model: frozen-tree bytes, logits drift and unchanged greedy answers.

  python -m benchmarks.studies.int8_drift [--items-per-domain 20] [--logit-items-per-domain 5] [--max-new-tokens 20]
                                  [--out int8_drift.json]

The base model without experts (SmolLM2-135M-Instruct, `moa=None`) in four settings: float32 (the CPU default),
bfloat16 (weights and compute), int8 (int8 projection kernels, float32 compute and embeddings) and int8_bf16 (int8
kernels, bfloat16 compute and embeddings: the accelerator setting). Prompts: the moa_10task test split, the first
N items of every domain, with the training system prompt, exactly as the evaluation builds them.
  bytes        parameter bytes of the frozen tree
  logits drift teacher-forced logits on prompt + reference (every real token): max / mean |difference|,
               KL(ref || setting) per token (nats), top-1 agreement, each against bfloat16 and against float32
  answers      greedy completions (max_new_tokens, as the evaluation decodes): share identical to the reference
               setting's, and share with the same extracted answer
Prints one JSON object (and writes it to --out).

Shape glossary: B batch, T tokens, V vocab, N items.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

SETTINGS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
            "int8": dict(dtype="float32", quantize="int8"), "int8_bf16": dict(dtype="bfloat16", quantize="int8")}
REFERENCES = ("bfloat16", "float32")


@jax.jit
def _pair_stats(ref, got, mask):
    """ref/got logits [B, T, V] f32, mask [B, T] -> sums over real tokens: max |d|, sum mean_V |d|, sum KL,
    top-1 agreements."""
    m = mask.astype(jnp.float32)
    diff = jnp.abs(ref - got)
    logp_ref, logp_got = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(got, -1)
    kl = jnp.sum(jnp.exp(logp_ref) * (logp_ref - logp_got), -1)                       # (B, T)
    agree = (jnp.argmax(ref, -1) == jnp.argmax(got, -1)).astype(jnp.float32)
    return (jnp.max(jnp.where(mask[..., None] > 0, diff, 0.0)), jnp.sum(jnp.mean(diff, -1) * m),
            jnp.sum(kl * m), jnp.sum(agree * m))


def logits_drift(models: dict, batches: list) -> dict:
    """{setting: {reference: stats}} over the real tokens of the PPL batches."""
    acc = {(s, r): np.zeros(4) for s in models for r in REFERENCES if r != s}
    tokens = 0.0
    for batch in batches:
        mask = batch["attention_mask"] * batch["valid"][:, None]
        logits = {s: m.logits(batch["tokens"], attention_mask=batch["attention_mask"]) for s, m in models.items()}
        tokens += float(mask.sum())
        for (s, r), a in acc.items():
            mx, mean_abs, kl, agree = (float(x) for x in _pair_stats(logits[r], logits[s], jnp.asarray(mask)))
            a[0] = max(a[0], mx)
            a[1:] += (mean_abs, kl, agree)
    out: dict = {}
    for (s, r), a in acc.items():
        out.setdefault(s, {})[f"vs_{r}"] = {"max_abs": a[0], "mean_abs": a[1] / tokens, "kl_per_token": a[2] / tokens,
                                            "top1_agreement": a[3] / tokens}
    return {"tokens": int(tokens), **out}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items-per-domain", type=int, default=20)
    p.add_argument("--logit-items-per-domain", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--source", default="smollm2-135m-instruct")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    import moa_jax
    from experiments.registry import get_experiment
    from moa_jax.generate.decode import eos_ids
    from moa_jax.data import tasks
    from moa_jax.data.pipeline import load_split
    from moa_jax.eval.evaluate import Method, generate_answers
    from moa_jax.eval.suite import build_eval_set
    from moa_jax.nn.quantize import param_bytes

    exp = get_experiment("moa_10task")
    t0 = time.perf_counter()
    models = {s: moa_jax.load_model(args.source, **kw) for s, kw in SETTINGS.items()}
    tok = models["float32"].tokenizer
    split = load_split(exp.data, tok, "test")
    result: dict = {"source": args.source, "experts": "none (base model)", "items": {},
                    "bytes": {s: param_bytes(m.params) for s, m in models.items()}}

    logit_set = build_eval_set(split, tuple(split.domains), args.logit_items_per_domain, 10, exp.data.buckets)
    result["items"]["logits"] = len(logit_set.rows)
    result["logits"] = logits_drift(models, logit_set.batches)

    es = build_eval_set(split, tuple(split.domains), args.items_per_domain, exp.eval.batch_size, exp.data.buckets)
    result["items"]["answers"] = len(es.rows)
    texts, seconds = {}, {}
    for s, m in models.items():
        t = time.perf_counter()
        texts[s], _ = generate_answers(m.config, Method("base", None, m.params), es.prompts, None, pad_id=split.pad_id,
                                       eos_ids=eos_ids(tok), max_new_tokens=args.max_new_tokens,
                                       batch_size=exp.eval.batch_size,
                                       decode=lambda ids: tok.decode(ids, skip_special_tokens=True))
        seconds[s] = round(time.perf_counter() - t, 1)
    answers = {}
    for s in models:
        answers[s] = {f"vs_{r}": {"identical": float(np.mean([a == b for a, b in zip(texts[s], texts[r])])),
                                  "same_answer": float(np.mean([tasks.extract_answer(a) == tasks.extract_answer(b)
                                                                for a, b in zip(texts[s], texts[r])]))}
                      for r in REFERENCES if r != s}
    result.update(answers=answers, generate_seconds=seconds, total_seconds=round(time.perf_counter() - t0, 1),
                  max_new_tokens=args.max_new_tokens, backend=jax.default_backend())
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**result, "completions": {s: texts[s][:10] for s in texts}}, f, indent=1)
    return result


if __name__ == "__main__":
    main()
