"""Names are names: the one rule for expert/domain names, and the one way an output or input file is placed inside
its folder.

A domain name comes from data the user may not control (a JSONL line's "domain", a dataset's class label, a file
stem, a `NAME=` spec of add_domain, a PEFT adapter's directory name), and it later names a folder: export_peft
writes `out_dir/<name>/`. So a name may hold only letters, digits and `._-+`, may not start with a dot (no `.`,
`..` or hidden folder) and is at most MAX_LEN characters; `check_name` refuses anything else with the place it came
from (file:line for data files).

Writers and readers join a name or an index entry to their folder with `inside(folder, relative)`, which refuses a
result outside the folder (an absolute path, `..`, or a symlink leading out), whatever the caller already checked.
Importing this module imports no jax. No arrays here (no shape glossary).
"""
from __future__ import annotations

import os

from moa_jax.errors import UserError

MAX_LEN = 100
ALLOWED = "letters, digits and '._-+' (not starting with '.')"


class BadNameError(UserError, ValueError):
    """An expert/domain name that cannot be used as one (it would become a file path)."""


class PathEscapeError(UserError, ValueError):
    """A file an artifact names, or a file a writer was asked to write, lies outside its folder."""


def name_problem(name) -> str | None:
    """Why `name` is not a valid expert/domain name, or None when it is."""
    if not isinstance(name, str) or not name:
        return "it is empty" if name == "" else f"it is not a string ({type(name).__name__})"
    if len(name) > MAX_LEN:
        return f"it is longer than {MAX_LEN} characters"
    bad = sorted({c for c in name if not (c.isalnum() or c in "._-+")})
    if bad:
        return f"it holds {''.join(bad)!r}"
    if name.startswith("."):
        return "it starts with '.'"
    return None


def check_name(name, where: str, error: type[UserError] = BadNameError) -> str:
    """`name` if it is a valid expert/domain name; else `error` naming `where` (e.g. file:line) and the rule."""
    problem = name_problem(name)
    if problem is not None:
        raise error(f"{where}: domain name {name!r} is refused ({problem}); a domain (expert) name may hold only "
                    f"{ALLOWED}, since it names the expert's adapter folder")
    return name


def inside(folder: str, relative: str, what: str = "file") -> str:
    """os.path.join(folder, relative), refused unless it stays inside `folder` (symlinks resolved)."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        raise PathEscapeError(f"{folder}: {what} {relative!r} is not a relative path inside that folder")
    path = os.path.join(folder, relative)
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise PathEscapeError(f"{folder}: {what} {relative!r} lies outside that folder; refused")
    return path
