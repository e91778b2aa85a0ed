"""Command line: answer prompts with a trained run's MoA model and show which expert answered.

    python -m moa_jax.generate --workdir runs/moa_10task --prompt "What is 12 + 30?" [--prompt ...]
        [--routing router|oracle|forced|base] [--expert N|DOMAIN] [--max_new_tokens 32] [--temperature 0]
        [--stage stage2]

Loads the run's base model (`model` in RUN/config.json) and the adapters of `--stage` (default the MoA stage-2
experts and routers, RUN/stage2/adapters, or where RUN/results.json says that stage's adapters came from), formats
each prompt exactly as in training (chat template + the run's system prompt, DataConfig.system_prompt), then
generates: 'router' lets the routers pick one expert per prompt from the prompt (as MoA is used), 'oracle' and
'forced' use --expert, 'base' turns the adapters off. Prints, per prompt, the expert (id and the domain it was
trained on) and the answer. A user mistake (not a run directory, a missing stage, a bad --expert, a base model that
is no longer where the run found it) is one `error:` line and exit code 2, found before the model loads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from moa_jax.train.checkpoint import AdapterNotFoundError
from moa_jax.errors import UsageError, cli_main
from moa_jax.routing import ROUTINGS


def run_info(workdir: str, stage: str) -> tuple[dict, str, dict]:
    """-> (the run's ExperimentConfig as a dict, the stage's adapters directory, the adapters' config)."""
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise AdapterNotFoundError(f"{workdir}: not a run directory (no config.json); pass the --workdir of "
                                   f"`python -m experiments.run`")
    with open(cfg_path) as f:
        exp = json.load(f)
    stage_dir = os.path.join(workdir, stage)
    results_path = os.path.join(workdir, "results.json")
    if not os.path.isdir(os.path.join(stage_dir, "adapters")) and os.path.exists(results_path):
        with open(results_path) as f:   # a stage loaded from another run (reuse_from) lives there
            stage_dir = json.load(f).get("stages", {}).get(stage, stage_dir)
    adapters = os.path.join(stage_dir, "adapters")
    if not all(os.path.exists(os.path.join(adapters, f)) for f in ("config.json", "index.json")):
        raise AdapterNotFoundError(f"{workdir}: no adapters for stage {stage!r} at {adapters} (has the run "
                                   f"finished that stage?)")
    with open(os.path.join(adapters, "config.json")) as f:
        return exp, adapters, json.load(f)


def system_prompt_of(data: dict) -> Optional[str]:
    """The system prompt training used (moa_jax.data.tokenize.resolve_system_prompt without loading the data)."""
    from moa_jax.data.tasks import TASK_SYSTEM_PROMPT
    setting = data.get("system_prompt", "auto")
    if setting != "auto":
        return setting
    return TASK_SYSTEM_PROMPT if data.get("source", "moa_tasks") == "moa_tasks" else None


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
    parser = argparse.ArgumentParser(prog="python -m moa_jax.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run directory of `python -m experiments.run`")
    parser.add_argument("--prompt", action="append", required=True, help="a user message (repeatable: one batch)")
    parser.add_argument("--routing", choices=ROUTINGS, default="router",
                        help="router (default): the routers pick the expert from the prompt; oracle / forced: "
                        "--expert picks it; base: no adapters")
    parser.add_argument("--expert", default=None, help="expert id or domain name (routing oracle / forced)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    parser.add_argument("--stage", default="stage2", help="whose adapters: stage2 (MoA), stage1, variants/NAME/stage2")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the run's)")
    args = parser.parse_args(argv)

    from moa_jax.api import load_model
    from moa_jax.config import MoAConfig
    from moa_jax.loading.base import check_base_model
    exp, adapters, saved = run_info(args.workdir, args.stage)
    moa = MoAConfig(**saved["moa"])
    domains = list(saved.get("domains") or [f"expert {i}" for i in range(moa.num_experts)])
    expert = expert_id(args.expert, domains, moa.num_experts)
    if args.routing in ("oracle", "forced") and expert is None:
        raise UsageError(f"--routing {args.routing} needs --expert (an id or one of {domains})")
    check_base_model(saved["model"]["source"])
    model = load_model(saved["model"]["source"], moa=moa, adapters=adapters,
                       dtype=args.dtype or saved["model"].get("dtype"))
    outs = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, routing=args.routing, expert=expert,
                          domain=[expert] * len(args.prompt) if args.routing == "oracle" else None,
                          temperature=args.temperature, seed=args.seed,
                          system_prompt=system_prompt_of(exp.get("data", {})))
    for prompt, out in zip(args.prompt, outs):
        who = "none (base model)" if out.expert < 0 else f"{out.expert} ({domains[out.expert]})"
        print(f"prompt: {prompt}\nexpert: {who} [routing={args.routing}]\nanswer: {out.text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
