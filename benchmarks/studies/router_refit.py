"""Routers fitted to convergence on cached base-model features against the ones stage 2 trained by SGD, on the same
validation and test prompts: what helps when the routers of a run with many domains route poorly.

    python -m benchmarks.studies.router_refit --workdir RUN [--stage stage2] [--prompts-per-domain 40] [--out DIR]

RUN is a finished two_stage work directory whose stage 2 (or the --stage named, e.g. variants/servable/stage2)
routes on the plain base model (moa.route_on=probe). There every router reads a pooled hidden state of the frozen
base model, so its input depends on no expert and no router, and fitting a router is multinomial logistic
regression on fixed features (moa_jax/train/router_fit.py, which add_domain uses for the new domains' outputs).
Here every output of every router is fitted (num_old = 0) on the first --prompts-per-domain TRAIN prompts of each
domain (each domain weighted equally), starting from stage 2's routers; the experts are untouched. Stage 2's SGD
saw stage2.steps x batch_size rows in all: with 52 domains and 40 steps of 8 rows, about 6 rows a domain.

Both router sets then go through the run's routing study (moa_jax/eval/calibration.py, without timing): routing
accuracy per exit layer k on the validation and test prompts, the exit layer the rule picks, calibration, and
abstention on the out-of-domain prompts. The answers of a correctly routed prompt are the run's moa_oracle answers
(the same expert), so routing accuracy is what this changes. Writes DIR/router_refit.json, DIR/router_refit.md and
DIR/adapters: stage 2's adapters with the fitted routers, in the format moa_jax.train.checkpoint.load_adapters
reads. Default DIR: RUN/router_refit.

Shape glossary: N cached prompts, L layers, E experts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.studies.routing_exit import load_study_inputs, not_a_run


def run_study(workdir: str, prompts_per_domain: int, out: str, stage: str = "stage2", log=print) -> dict:
    from moa_jax.eval.calibration import routing_study
    from moa_jax.params import merge_params
    from moa_jax.routing import routes_on_probe
    from moa_jax.run_artifacts import read_run
    from moa_jax.train.checkpoint import save_adapters
    from moa_jax.train.router_fit import fit_routers
    moa = read_run(workdir, stage).moa
    if not routes_on_probe(moa):
        raise ValueError(f"{workdir}: {stage} routes on the adapted pass (moa.route_on={moa.route_on!r}); "
                         f"the routers' inputs then depend on the experts and no convex fit applies")
    x = load_study_inputs(workdir, stage, ("train", "validation", "test"))
    t0 = time.perf_counter()
    fitted, stats = fit_routers(x.cfg, x.info.moa, x.frozen, x.data["train"], x.trainable, 0, prompts_per_domain,
                                batch_size=x.exp.eval.batch_size, buckets=x.exp.data.buckets)
    fit_seconds = time.perf_counter() - t0
    studies = {}
    for name, tree in (("sgd", x.trainable), ("fitted", fitted)):
        _, studies[name] = routing_study(x.cfg, x.moa, merge_params(x.frozen, tree), x.data, x.tokenizer,
                                         **x.study_kwargs, timing=False)
        full = studies[name]["by_exit_layer"][-1]
        best = max(r["validation_accuracy"] for r in studies[name]["by_exit_layer"])
        log(f"{name:<7} full pass: validation {full['validation_accuracy']:.3f}, test {full['test_accuracy']:.3f}; "
            f"best validation {best:.3f}; rule's exit layer {studies[name]['exit_rule']['rule_k']}")
    os.makedirs(out, exist_ok=True)
    save_adapters(os.path.join(out, "adapters"), fitted, {**x.meta, "router_fit": stats})
    return {"workdir": workdir, "stage": stage, "prompts_per_domain": prompts_per_domain, "fit": stats,
            "fit_seconds": fit_seconds, "stage2_rows": x.exp.stage2.steps * x.exp.data.batch_size,
            "domains": list(x.info.domains), "studies": studies}


def markdown(res: dict) -> str:
    s, f = res["studies"]["sgd"], res["studies"]["fitted"]
    lines = [f"Routers of {res['workdir']} (stage 2's SGD: {res['stage2_rows']} rows in all) against the same "
             f"routers fitted on {res['fit']['examples']} cached train prompts ({res['prompts_per_domain']} per "
             f"domain, {res['fit_seconds']:.0f} s):", "",
             "| k | validation, SGD | validation, fitted | test, SGD | test, fitted |", "|---|---|---|---|---|"]
    for a, b in zip(s["by_exit_layer"], f["by_exit_layer"]):
        lines.append(f"| {a['k']} | {a['validation_accuracy']:.3f} | {b['validation_accuracy']:.3f} | "
                     f"{a['test_accuracy']:.3f} | {b['test_accuracy']:.3f} |")
    for name, st in (("SGD", s), ("fitted", f)):
        ab = st["abstention"]["at_rule_threshold"]
        lines.append(f"\n{name}: rule's exit layer {st['exit_rule']['rule_k']}; temperature "
                     f"{st['calibration']['fitted_temperature']:.3f}; at the rule's threshold "
                     f"{st['abstention']['rule_threshold']:.3f}: test coverage {ab['test']['coverage']:.3f}, "
                     f"routed test accuracy {ab['test']['accuracy_routed']:.3f}, out-of-domain abstained "
                     f"{ab['out_of_domain_abstained']:.3f}; validation domains below 1 at the full pass: "
                     f"{st['by_exit_layer'][-1]['validation_missed'] or 'none'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="a finished experiments.run work directory (two_stage)")
    ap.add_argument("--stage", default="stage2", help="whose routers (default stage2: the MoA model)")
    ap.add_argument("--prompts-per-domain", type=int, default=40, help="cached train prompts per domain")
    ap.add_argument("--out", default="", help="output folder (default: WORKDIR/router_refit)")
    args = ap.parse_args(argv)
    if not_a_run(args.workdir):
        return 2
    if args.prompts_per_domain < 1:
        print("error: --prompts-per-domain must be >= 1", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.workdir, "router_refit")
    try:
        res = run_study(args.workdir, args.prompts_per_domain, out, args.stage)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(out, "router_refit.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    md = markdown(res)
    with open(os.path.join(out, "router_refit.md"), "w") as fh:
        fh.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
