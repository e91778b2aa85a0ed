"""The `moa-jax` console script: one command whose subcommands are the project's command lines.

    moa-jax train ...       = python -m experiments.run ...
    moa-jax generate ...    = python -m moa_jax.cli.generate ...
    moa-jax inspect ...     = python -m moa_jax.data.inspect ...
    moa-jax route-serve ... = python -m moa_jax.cli.route_serve ...

A subcommand hands its arguments unchanged to that command line's `main`: the same options, output and exit codes;
`moa-jax SUBCOMMAND --help` is its help. No subcommand or an unknown one is one `error:` line and exit code 2.
Nothing heavy is imported before a subcommand runs (`moa-jax --help` imports no jax). `train` runs the presets of
the `experiments` package, which `pip install .` installs beside moa_jax (setup.cfg). Registered in setup.cfg
(`[options.entry_points]`); `python -m moa_jax.cli.main` is the same command.
"""
from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Optional, Sequence

from moa_jax.errors import UsageError, cli_main

PROG = "moa-jax"
Main = Callable[[Optional[Sequence[str]]], int]


# One loader per subcommand: the command line's module is imported only when it runs.
def _train() -> Main:
    from experiments.run import main
    return main


def _generate() -> Main:
    from moa_jax.cli.generate import main
    return main


def _inspect() -> Main:
    from moa_jax.data.inspect import main
    return main


def _route_serve() -> Main:
    from moa_jax.route_serve import main
    return main


class Subcommand(NamedTuple):
    module: str                  # its `python -m` form
    summary: str                 # its line in `moa-jax --help`
    load: Callable[[], Main]     # -> that command line's main(argv)


SUBCOMMANDS = {
    "train": Subcommand("experiments.run", "run a named experiment: --exp=NAME, or --list", _train),
    "generate": Subcommand("moa_jax.cli.generate", "answer prompts with a trained run, naming the expert",
                           _generate),
    "inspect": Subcommand("moa_jax.data.inspect", "a data source's counts, token lengths and examples", _inspect),
    "route-serve": Subcommand("moa_jax.cli.route_serve", "an OpenAI-compatible front end that routes each request "
                              "to an exported expert on a multi-LoRA server", _route_serve),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:{width}s}  {sub.summary} (python -m {sub.module})" for name, sub in SUBCOMMANDS.items())
    return (f"usage: {PROG} SUBCOMMAND [ARGS ...]\n\n"
            "Mixture-of-LoRAs (MoA) multitask tuning of LLMs in JAX/Flax: the command lines.\n\n"
            f"subcommands (each one is the command line in parentheses, with the same options):\n{rows}\n\n"
            f"`{PROG} SUBCOMMAND --help` shows a subcommand's options.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main(_main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    names = ", ".join(SUBCOMMANDS)
    if not args:
        raise UsageError(f"give a subcommand ({names}); `{PROG} --help` describes them")
    if args[0] in ("-h", "--help"):
        print(usage())
        return 0
    sub = SUBCOMMANDS.get(args[0])
    if sub is None:
        raise UsageError(f"unknown subcommand {args[0]!r}: choose from {names} (`{PROG} --help`)")
    return sub.load()(args[1:])


if __name__ == "__main__":
    sys.exit(main())
