"""The one user-facing error contract of every command line (experiments.run, moa_jax.cli.generate,
moa_jax.data.inspect, benchmarks.run, and the `moa-jax` console script over them).

A `UserError` is a mistake the user can fix (a config value, a data file, a model path, a checkpoint, a work
directory): its message names the file/line/field/key and what to do. `cli_main` prints it as one `error: ...`
line (two at most) and returns exit code 2. Anything else is a bug and keeps its traceback. ConfigError, DataError,
the model-loading errors and the checkpoint errors all derive from UserError (and from the builtin class they
replaced, e.g. ValueError or FileNotFoundError, so existing `except` clauses still catch them).
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Callable, Optional, Sequence

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake in the user's input; the message says where and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field."""


class UsageError(UserError, ValueError):
    """Command-line arguments that cannot work together (or name something that does not exist)."""


class WorkdirError(UserError, OSError):
    """An output directory cannot be created or written."""


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition`: the configs' field checks."""
    if not condition:
        raise ConfigError(message)


def check_rank_fits(model_cfg, moa) -> None:
    """Refuse a MoA rank larger than the narrowest adapted projection (a ModelConfig and a MoAConfig), before any
    expert array is allocated: such a rank adds no expressiveness, and a huge one would fail deep in allocation."""
    width, name = min((min(model_cfg.projection_shape(t)), t) for t in moa.targets)
    require(moa.rank <= width, f"moa.rank={moa.rank} is larger than the narrowest adapted projection ({name}: "
                               f"{'x'.join(map(str, model_cfg.projection_shape(name)))} in this base model); "
                               f"--set moa.rank=N with N <= {width}")


def check_writable(directory: str, what: str = "--workdir") -> None:
    """Create `directory` if needed and prove a file can be written in it (before any slow work starts)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise WorkdirError(f"{what} {directory}: is a file, not a directory; choose another {what}")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test_"):
            pass
    except OSError as e:
        raise WorkdirError(f"{what} {directory}: cannot write there ({e.strerror or e}); choose another "
                           f"{what} or fix its permissions") from None


def cli_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a CLI's `main(argv)`; a UserError becomes `error: <message>` on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as e:
        message = str(e.args[0]) if e.args else str(e)
        lines = message.strip().splitlines() or [type(e).__name__]
        # One line, or two; a longer message (e.g. one carrying a whole table) keeps its first line, which names
        # the file/field and the fix.
        print("error: " + "\n".join(lines if len(lines) <= 2 else lines[:1]), file=sys.stderr)
        return USER_ERROR_EXIT
    except BrokenPipeError:   # the reader of our output stopped early (`... | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
