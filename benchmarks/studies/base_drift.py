"""Routing and logits drift of an export served on another base than the one it was trained on (e.g. the
full-precision Hub checkpoint instead of the embedded Q4_1 GGUF, dequantised, that moa_jax trained on).

  python -m benchmarks.studies.base_drift --export export/peft --base HuggingFaceTB/SmolLM2-135M-Instruct
      [--exp moa_10task] [--items-per-domain 20] [--out base_drift.json]

--export: a servable export written by `model.export_peft(dir)` (its base/ holds the trained base); --base: the base
a server would load instead (a Hub id or a directory; Hub ids need network access or the Hugging Face cache). Both
bases run the export's own files with torch: its reference router (routing) and PEFT (the routed expert's adapter
on that base). Prompts: the first N test items of every domain of --exp's data, routed and formatted as training
did (router.json's template and system prompt).
  routing   share of prompts routed to the same expert on both bases; router logits (every layer) max / mean
            |difference|; each base's routing accuracy against the prompt's domain (expert names are domain names)
  logits    next-token logits after each prompt, with the expert the trained base routes to: max / mean
            |difference|, KL(trained || other) per prompt (nats), top-1 agreement
Prints one JSON object (and writes it to --out). A base that cannot be loaded is one `error:` line, exit code 2.

Shape glossary: N prompts, L layers, E experts, V vocab.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def prompts_of(exp_name: str, items_per_domain: int) -> tuple[list, list[str]]:
    """The first items_per_domain test items of each domain of the experiment's data: (messages, domain names)."""
    from experiments.registry import get_experiment
    from moa_jax.data.pipeline import load_split
    from moa_jax.loading import DEFAULT_MODEL, load_tokenizer
    exp = get_experiment(exp_name)
    split = load_split(exp.data, load_tokenizer(DEFAULT_MODEL), "test")
    rows = [int(r) for d in range(len(split.domains)) for r in np.flatnonzero(split.domain == d)[:items_per_domain]]
    return [split.example(r)["messages"] for r in rows], [split.domains[split.domain[r]] for r in rows]


def next_token_logits(router, export: str, messages: list, experts: list[str]) -> np.ndarray:
    """[N, V] float32: the logits after each prompt with its expert's PEFT adapter on the router's base model. The
    adapters are injected into that model, so this runs after its routing."""
    import torch
    from peft import PeftModel
    names = sorted(set(experts))
    model = PeftModel.from_pretrained(router.model, os.path.join(export, names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(os.path.join(export, name), adapter_name=name)
    rows = []
    with torch.no_grad():
        for msgs, expert in zip(messages, experts):
            model.set_adapter(expert)
            ids = torch.tensor([router.prompt_ids(msgs)])
            rows.append(model(input_ids=ids).logits[0, -1].float().numpy())
    return np.stack(rows)


def drift(ref: np.ndarray, got: np.ndarray) -> dict:
    """ref/got logits [N, V] -> max / mean |d|, mean KL(ref || got), top-1 agreement."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lr, lg = log_softmax(ref.astype(np.float64)), log_softmax(got.astype(np.float64))
    return {"max_abs": float(np.abs(ref - got).max()), "mean_abs": float(np.abs(ref - got).mean()),
            "kl": float((np.exp(lr) * (lr - lg)).sum(-1).mean()),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True, help="a servable export directory with base/ (export_peft)")
    p.add_argument("--base", required=True, help="the other base: a Hub id or a transformers checkpoint directory")
    p.add_argument("--exp", default="moa_10task", help="the experiment whose test prompts are used")
    p.add_argument("--items-per-domain", type=int, default=20)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    from moa_jax import reference_router
    t0 = time.perf_counter()
    try:
        spec = reference_router.read_spec(args.export)
    except (OSError, ValueError) as e:
        return _error(str(e))
    if not spec.get("base_dir"):
        return _error(f"--export {args.export}: router.json names no base/ folder (export with model.export_peft(dir) "
                      f"and its default base)")
    if (os.path.isabs(args.base) or args.base.startswith(".")) and not os.path.isdir(args.base):
        return _error(f"--base {args.base}: no such folder")
    try:   # the other base first: where it cannot be had, nothing else has run
        other = reference_router.load(args.export, args.base)
    except (OSError, ValueError) as e:
        return _error(f"--base {args.base}: cannot load it ({str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
                      f"); a Hub id needs network access or the Hugging Face cache: download it where the Hub is "
                      f"reachable (`huggingface-cli download {args.base} --local-dir DIR`) and pass --base DIR")
    trained = reference_router.load(args.export)
    messages, domains = prompts_of(args.exp, args.items_per_domain)
    routed = {}
    logits = {}
    for name, router in (("trained", trained), ("other", other)):
        logits[name] = np.concatenate([router.logits_batch(messages[i:i + 16])
                                       for i in range(0, len(messages), 16)])              # (N, L, E)
        routed[name] = [router.experts[reference_router.decide(lg, spec["decision"])] for lg in logits[name]]
    diff = np.abs(logits["trained"] - logits["other"])
    result = {"export": args.export, "trained_base": reference_router.base_of(args.export, spec),
              "other_base": args.base, "prompts": len(messages),
              "routing": {"agreement": float(np.mean([a == b for a, b in zip(routed["trained"], routed["other"])])),
                          "router_logits_max_abs": float(diff.max()),
                          "router_logits_mean_abs": float(diff.mean())}}
    if set(domains) <= set(spec["experts"]):
        result["routing"]["accuracy"] = {k: float(np.mean([e == d for e, d in zip(v, domains)]))
                                         for k, v in routed.items()}
    result["logits"] = drift(next_token_logits(trained, args.export, messages, routed["trained"]),
                             next_token_logits(other, args.export, messages, routed["trained"]))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
