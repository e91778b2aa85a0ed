"""Benchmark suite CLI (targets and method: BENCHMARKS.md):

  PYTHONPATH=. python -m benchmarks.run --suite cpu --out bench_cpu.json [--md bench_cpu.md] [--rounds N]
      [--only train,inference,decode,remat,recompile]

Suites: smoke (CI-sized), cpu (the target table on cpu-tiny; <= 5 min on 2 idle cores), gpu (gpu-1b bf16 on
one accelerator, MFU vs 989 TFLOP/s), smollm2 (LM-head share of a SmolLM2-shaped step; slow). Writes the JSON
and a markdown report (default: the JSON path with .md), and prints the target table. An unknown --only group or
an output path that cannot be written is one `error:` line and exit code 2, before any benchmark runs.
"""
from __future__ import annotations

import argparse
import os
import sys

from benchmarks import cases, report, timing
from moa_jax.errors import UsageError, check_writable, cli_main


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", required=True, choices=("smoke", "cpu", "gpu", "smollm2"))
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--md", default=None, help="markdown output path (default: --out with .md)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: suite's, >= 10 on cpu)")
    p.add_argument("--only", default="", help="comma-separated group names to run")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    groups, extra = cases.suite_groups(args.suite, args.rounds)
    known = [g.name for g in groups] + [k for k in ("recompile",) if k in extra]
    if set(only) - set(known):
        raise UsageError(f"--only {args.only}: unknown group(s) {sorted(set(only) - set(known))}; suite "
                         f"{args.suite} has {known}")
    for path in (args.out, args.md or args.out):
        check_writable(os.path.dirname(os.path.abspath(path)), "--out" if path == args.out else "--md")
    machine = timing.machine_info()
    result = cases.run_suite(args.suite, args.rounds, only or None)
    result["machine"] = machine
    result["loadavg_end"] = list(os.getloadavg())
    result["command"] = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    report.write_json(result, args.out)
    md = report.markdown(result)
    with open(args.md or os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(md)
    print("\n".join(report.target_table(result)))
    return result


def _cli(argv=None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(_cli))
