"""One run per work directory: `run_lock(workdir)` holds `<workdir>/run.lock` for the length of a run.

Two runs writing one work directory interleave their checkpoints and metrics rows (orbax's temporary directories
collide, metrics.jsonl gets every step twice), so the second run is refused up front with
`DIR is in use by another run (pid N)` (a WorkdirError: exit 2 from the CLIs). The lock file holds
{"pid", "host"}; it is written to a private file first and hard-linked into place (the link fails if the lock
exists, atomically), so no run ever sees a lock without its owner. It is removed when the run ends, by return or by
exception. A SIGKILLed run leaves it behind: a lock whose pid is not alive on this host is stale, taken over with
one WARNING. A lock from another host cannot be checked and counts as held. (Two runs that start in the same
instant on a directory with a stale lock can both take it over; a hard-link-free filesystem is not supported.)

Multi-host runs: only process 0 holds the lock (the others write nothing of their own to the work directory).
Importing this module imports no jax. No arrays here (no shape glossary).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from typing import Iterator

from moa_jax.errors import WorkdirError, check_writable

log = logging.getLogger("moa_jax")
LOCK_NAME = "run.lock"


class WorkdirInUseError(WorkdirError):
    """Another live run holds the work directory's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by someone else
        return True
    return True


def _read(path: str) -> dict:
    """The lock's owner; {} when there is none (or the file is not a lock)."""
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}
    except (OSError, ValueError):
        return {}


def acquire(workdir: str) -> str:
    """Create the lock of `workdir` (taking over a stale one) -> its path; WorkdirInUseError if a live run holds
    it."""
    check_writable(workdir)
    path = os.path.join(workdir, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    mine = f"{path}.{me['pid']}"
    with open(mine, "w") as f:
        json.dump(me, f)
    try:
        return _link(mine, path, workdir, me)
    finally:
        os.remove(mine)


def _link(mine: str, path: str, workdir: str, me: dict) -> str:
    for _ in range(3):   # a takeover races other takeovers: retry the exclusive link, never overwrite
        try:
            os.link(mine, path)
        except FileExistsError:
            owner = _read(path)
            pid, host = owner.get("pid"), owner.get("host")
            if pid is not None and (host != me["host"] or _alive(pid)):
                where = "" if host == me["host"] else f" on host {host}"
                raise WorkdirInUseError(f"{workdir} is in use by another run (pid {pid}{where}); wait for it to "
                                        f"finish or use another --workdir") from None
            log.warning("%s: taking over the lock of a run that is gone (pid %s, killed or crashed)", workdir, pid)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        return path
    raise WorkdirInUseError(f"{workdir} is in use by another run (its lock {path} keeps changing)")


def release(path: str) -> None:
    """Remove the lock if it is still ours (never another run's that took over a lock we lost)."""
    if _read(path).get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def run_lock(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Hold `workdir`'s lock for the block (enabled=False: a process that is not the lock holder, e.g. process
    k > 0 of a multi-host run)."""
    if not enabled:
        yield
        return
    path = acquire(workdir)
    try:
        yield
    finally:
        release(path)

