"""Command line: `python -m experiments.run --exp=NAME [--workdir=DIR] [--set key=value ...]`; `--list` names them.

Logs the resolved config, runs the experiment (resuming from DIR if it holds checkpoints), writes the report
(results.md, results.json, PNG figures) into DIR and prints its summary. A user mistake (config, data, model file,
checkpoint, work directory) is one `error:` line and exit code 2, found before the model loads where it can be.
Multi-host: pass --coordinator/--num_processes/--process_id (or MOA_* env vars), or --distributed=auto on TPU pods.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys


class _Formatter(logging.Formatter):
    """`12:00:00 moa_jax message`; warnings and errors say so: `12:00:00 moa_jax WARNING: message`."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        if record.levelno < logging.WARNING:
            return line
        return line.replace(f" {record.name} ", f" {record.name} {record.levelname}: ", 1)


def main(argv=None) -> int:
    from moa_jax.errors import cli_main
    return cli_main(_main, argv)


BUDGET_NOTE = """\
Budgets: a preset is the same config on every backend. moa_10task and moa_10task_ablations take the
reduced CPU budget (80 + 40 steps of 8 packed rows, 20 test items per domain); moa_10task_accel and
moa_10task_ablations_accel take the full accelerator budget (1500 + 500 steps at batch 32, 200 test items per
domain) for a GPU or TPU. smoke and moa_7b have one budget. --set overrides any field, e.g. --set stage1.steps=1500
--set data.batch_size=32. The run logs its resolved config and writes it to <workdir>/config.json."""


def experiment_summaries() -> dict[str, str]:
    """Registered experiment name -> the first paragraph of its preset's docstring, on one line."""
    from experiments.registry import EXPERIMENTS
    return {name: " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split()) for name, fn in
            sorted(EXPERIMENTS.items())}


def experiment_listing() -> str:
    rows = experiment_summaries()
    width = max(map(len, rows))
    return "\n".join(f"  {name:{width}s}  {summary}" for name, summary in rows.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"experiments (--exp):\n{experiment_listing()}\n\n{BUDGET_NOTE}")
    parser.add_argument("--exp", help="registered experiment name (listed below and by --list)")
    parser.add_argument("--list", action="store_true", help="print the registered experiments with their summary "
                        "and exit")
    parser.add_argument("--workdir", default=None, help="output directory (default: runs/<exp>); a run resumes "
                        "from the checkpoints it holds")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set stage1.steps=50 (repeatable)")
    parser.add_argument("--distributed", choices=("off", "auto"), default="off",
                        help="auto: jax.distributed.initialize() discovers the cluster (TPU pods, SLURM); "
                        "off (default): single process unless --coordinator is given")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="multi-host: address of process 0 (or env MOA_COORDINATOR)")
    parser.add_argument("--num_processes", type=int, default=None,
                        help="multi-host: number of processes (or env MOA_NUM_PROCESSES)")
    parser.add_argument("--process_id", type=int, default=None,
                        help="multi-host: this process's rank, 0..num_processes-1 (or env MOA_PROCESS_ID)")
    parser.add_argument("--no_progress", action="store_true",
                        help="no progress bars (training and evaluation); the log lines stay")
    return parser


def _main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(experiment_listing())
        return 0
    if not args.exp:
        parser.error("--exp is required (see --list)")
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter("%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint step at INFO

    from moa_jax import distributed
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed == "auto")
    from experiments.registry import check_runnable, get_job
    from moa_jax.config import ConfigError
    from moa_jax.workflows import resolve_job, run_job
    try:
        job = resolve_job(get_job(args.exp), args.overrides)
        check_runnable(job.exp)
    except KeyError as e:   # an unknown --exp
        raise ConfigError(e.args[0]) from None
    workdir = args.workdir or f"runs/{args.exp}"
    logging.getLogger("moa_jax").info(
        "experiment %s (workflow %s) -> %s\n%s", job.exp.name, job.workflow, workdir,
        json.dumps({**({job.workflow: dataclasses.asdict(job.section)} if job.section else {}),
                    **({} if job.workflow == "add_domain" else {"experiment": dataclasses.asdict(job.exp)})},
                   indent=1, default=str))
    results = run_job(job, workdir, progress=not args.no_progress)   # each workflow writes its report
    from moa_jax.eval.report import summary
    print(summary(results, workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
