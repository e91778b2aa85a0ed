"""The routing study of a finished run again (moa_jax/eval/calibration.py: routing accuracy and the cut routing
pass's time as a share of a full base prefill per exit layer k, calibration, abstention), without training or
evaluating anything else: to time every exit layer (a run's study times some) on a quiet machine, or on the hardware
that will serve.

  python -m benchmarks.studies.routing_exit --workdir RUN [--out FILE.json]

RUN is a finished two_stage work directory whose stage 2 routes top-1 from the prompt. The settings are the run's
(its MoAConfig with exit_layer, temperature and abstain_below as it asked for them: AUTO ones are picked again by
the same rules, on the same validation prompts), so the accuracies equal the run's; only the seconds are new.
Prints the per-k table and the picks; --out writes the study as JSON (the shape of results.json "routing").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any


@dataclasses.dataclass
class StudyInputs:
    """What the routing study of a finished run's stage needs, loaded once."""
    exp: Any                  # ExperimentConfig
    info: Any                 # RunInfo of the stage
    cfg: Any                  # ModelConfig
    frozen: Any
    tokenizer: Any
    trainable: Any            # the stage's adapters and routers
    meta: dict                # their saved config
    data: dict                # split -> TokenizedSplit
    moa: Any                  # the stage's MoAConfig with the run's exit_layer / temperature / abstain_below
    study_kwargs: dict        # the keyword arguments of calibration.routing_study but `timing` / `timed`


def load_study_inputs(workdir: str, stage: str = "stage2", splits=("validation", "test")) -> StudyInputs:
    """The run's base model, the stage's adapters, the splits and the study settings as the run asked for them
    (AUTO ones are picked again by the same rules, on the same validation prompts)."""
    from moa_jax.data.pipeline import load_split
    from moa_jax.data.prompt_format import resolve_prompt_format
    from moa_jax.data.sources import resolve_system_prompt
    from moa_jax.loading.base import default_dtype, load_base_model
    from moa_jax.run_artifacts import read_json, read_run
    from moa_jax.train.checkpoint import load_adapters
    from moa_jax.workflows.add_domain import experiment_from_dict
    exp = experiment_from_dict(read_json(os.path.join(workdir, "config.json")))
    info = read_run(workdir, stage)
    cfg, frozen, tokenizer = load_base_model(info.source, default_dtype(info.dtype or exp.dtype))
    trainable, meta = load_adapters(info.adapters)
    data = {split: load_split(exp.data, tokenizer, split) for split in splits}
    moa = dataclasses.replace(info.moa, **{k: getattr(exp.moa, k) for k in ("exit_layer", "temperature",
                                                                             "abstain_below")})
    kwargs = dict(names=info.domains, system_prompt=resolve_system_prompt(exp.data.system_prompt, exp.data.source),
                  prompt_format=resolve_prompt_format(exp.data.prompt_format, tokenizer),
                  test_items=exp.eval.items_per_domain, batch_size=exp.eval.batch_size)
    return StudyInputs(exp, info, cfg, frozen, tokenizer, trainable, meta, data, moa, kwargs)


def run_study(workdir: str) -> dict:
    from moa_jax.eval.calibration import routing_study
    from moa_jax.params import merge_params
    x = load_study_inputs(workdir)
    t0 = time.perf_counter()
    _, report = routing_study(x.cfg, x.moa, merge_params(x.frozen, x.trainable), x.data, x.tokenizer,
                              **x.study_kwargs, timed="all")
    report["seconds"] = time.perf_counter() - t0
    return report


def not_a_run(workdir: str) -> bool:
    """True, after one `error:` line on stderr, when `workdir` holds no finished experiments.run work directory."""
    if os.path.isfile(os.path.join(workdir, "config.json")):
        return False
    print(f"error: {workdir}: no config.json (not a finished experiments.run work directory)", file=sys.stderr)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="a finished experiments.run work directory (two_stage)")
    ap.add_argument("--out", default="", help="write the study as JSON here")
    args = ap.parse_args(argv)
    if not_a_run(args.workdir):
        return 2
    report = run_study(args.workdir)
    print("k | validation accuracy | test accuracy | routing pass / full base prefill")
    for r in report["by_exit_layer"]:
        print(f"{r['k']} | {r['validation_accuracy']:.3f} | {r['test_accuracy']:.3f} | {r['share_of_prefill']:.3f}")
    print(json.dumps({"exit_rule": report["exit_rule"], "prefill_seconds": report["prefill_seconds"],
                      "temperature": report["calibration"]["temperature"], "seconds": report["seconds"]}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
