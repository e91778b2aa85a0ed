"""Command line: answer prompts with a trained run's MoA model and show which expert answered.

    python -m moa_jax.cli.generate --workdir runs/moa_10task --prompt "What is 12 + 30?" [--prompt ...]
        [--routing router|oracle|forced|base] [--expert N|DOMAIN] [--max_new_tokens 32] [--temperature 0]
        [--top-k 0] [--top-p 1.0] [--seed 0] [--stage STAGE] [--source PATH]

Loads the run with `moa_jax.load_run`: its base model (or --source, where it moved) and the adapters of `--stage`
(default the run's final model: the MoA stage-2 experts and routers, RUN/stage2/adapters, RUN/refit for add_domain,
or where RUN/results.json says that stage's adapters came from), formats each prompt exactly as in training (the
run's prompt format, chat template or plain, and its system prompt), then
generates: 'router' lets the routers pick one expert per prompt from the prompt (as MoA is used), 'oracle' and
'forced' use --expert, 'base' turns the adapters off. Prints, per prompt, the expert (id and the domain it was
trained on) and the answer. Decoding is greedy unless --temperature > 0, which samples (reproducibly for a --seed),
optionally from the --top-k best tokens and/or the nucleus of probability --top-p (moa_jax/generate/sampling.py).
A user mistake (not a run directory, a missing stage, a bad --expert, a base model that
is no longer where the run found it, a --top-p outside (0, 1], a negative --top-k, either without --temperature)
is one `error:` line and exit code 2, found before the model loads.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from moa_jax.errors import UsageError, cli_main
from moa_jax.routing import ROUTINGS, resolve


def expert_id(value: Optional[str], domains: list[str], num_experts: int) -> Optional[int]:
    """--expert as an id or a domain name -> id."""
    if value is None:
        return None
    if value in domains:
        return domains.index(value)
    try:
        idx = int(value)
    except ValueError:
        raise UsageError(f"--expert {value!r}: give an expert id in [0, {num_experts}) or a domain name "
                         f"{domains}") from None
    if not 0 <= idx < num_experts:
        raise UsageError(f"--expert {idx}: out of range [0, {num_experts}); domains {domains}")
    return idx


def main(argv=None) -> int:
    return cli_main(_main, argv)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa_jax.cli.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run directory of `python -m experiments.run`")
    parser.add_argument("--prompt", action="append", required=True, help="a user message (repeatable: one batch)")
    parser.add_argument("--routing", choices=ROUTINGS, default="router",
                        help="router (default): the routers pick the expert from the prompt; oracle / forced: "
                        "--expert picks it; base: no adapters")
    parser.add_argument("--expert", default=None, help="expert id or domain name (routing oracle / forced)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0,
                        help="sample from the K most likely tokens only (0 = off, the default; needs --temperature)")
    parser.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0,
                        help="nucleus sampling: from the smallest set of most likely tokens whose probability "
                        "reaches P, in (0, 1] (1.0 = off, the default; after --top-k; needs --temperature)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    parser.add_argument("--stage", default=None, help="whose adapters: default the run's final model (stage2, or "
                        "refit for add_domain), stage1, mixed_lora, moe_lora, variants/NAME/stage2")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the run's)")
    parser.add_argument("--source", default=None, help="the run's base model, where it is now (default: where the "
                        "run found it)")
    args = parser.parse_args(argv)

    from moa_jax.api import load_run
    from moa_jax.generate.sampling import check_sampling
    check_sampling(args.temperature, args.top_k, args.top_p, flags=True)
    from moa_jax.run_artifacts import read_run
    run = read_run(args.workdir, args.stage, args.source)    # every user mistake is found before the model loads
    domains = list(run.domains or [f"expert {i}" for i in range(run.moa.num_experts)])
    expert = expert_id(args.expert, domains, run.moa.num_experts)
    if resolve(run.moa, args.routing).needs_given_expert and expert is None:
        raise UsageError(f"--routing {args.routing} needs --expert (an id or one of {domains})")
    model = load_run(args.workdir, args.stage, source=args.source, dtype=args.dtype)
    outs = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, routing=args.routing, expert=expert,
                          domain=None if expert is None else [expert] * len(args.prompt),   # oracle: one per prompt
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, out in zip(args.prompt, outs):
        who = "none (base model)" if out.expert < 0 else f"{out.expert} ({domains[out.expert]})"
        print(f"prompt: {prompt}\nexpert: {who} [routing={args.routing}]\nanswer: {out.text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
