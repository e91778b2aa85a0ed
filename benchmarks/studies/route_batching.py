"""What micro-batching buys the routing front end: the reference router's time per prompt, routed one at a time
(ReferenceRouter.route) vs in padded batches (route_batch, what moa_jax/route_serve.py's MicroBatcher runs).

  python -m benchmarks.studies.route_batching [--export DIR] [--prompts 64] [--batch 1,4,16] [--threads 2]

--export: a servable export (default: one is written to a temporary folder from the embedded SmolLM2-135M-Instruct
with fresh probe routers over 3 experts; routing time does not depend on the router weights). Prompts: short
arithmetic and spelling questions of varied length, formatted with the export's chat template. Prints one JSON
object: for each batch size, milliseconds per prompt (the best of 3 passes over all prompts) and the batches'
agreement with one-at-a-time routing.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _export(folder: str) -> str:
    import dataclasses
    import moa_jax
    model = moa_jax.load_model("smollm2-135m-instruct", moa=moa_jax.MoAConfig(num_experts=3, rank=4,
                                                                               route_on="probe"))
    dataclasses.replace(model, domains=("a", "b", "c")).export_peft(folder)
    return folder


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", default="")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch", default="1,4,16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch
    from moa_jax import reference_router
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        export = args.export or _export(os.path.join(tmp, "export"))
        router = reference_router.load(export)
        prompts = [f"What is {i} + {3 * i}?" if i % 2 else f"Spell '{'ab' * (1 + i % 7)}' backward." + " Now." * (i % 5)
                   for i in range(args.prompts)]
        alone = [router.route(q) for q in prompts]
        result = {"export": args.export or "embedded SmolLM2-135M-Instruct, fresh probe routers",
                  "prompts": len(prompts), "threads": args.threads, "ms_per_prompt": {},
                  "agreement_with_one_at_a_time": {}}
        for size in (int(b) for b in args.batch.split(",")):
            best, routed = float("inf"), []
            for _ in range(3):
                t = time.perf_counter()
                routed = [e for i in range(0, len(prompts), size) for e in router.route_batch(prompts[i:i + size])]
                best = min(best, time.perf_counter() - t)
            result["ms_per_prompt"][size] = round(1000 * best / len(prompts), 2)
            result["agreement_with_one_at_a_time"][size] = sum(a == b for a, b in zip(routed, alone)) / len(prompts)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
