"""The directory where every process of one `ainode serve` counts its metrics.

It is made under the system's temporary folder and removed when the `ainode serve` that owns
it ends. A node killed outright cannot remove it: the next start removes this user's
directories whose owner is gone, so crashes do not fill the temporary folder. An owner holds an
exclusive lock on the directory's lock file while it runs; the kernel drops the lock with the
process, so a lock that can be taken means the owner is gone. Unlike a pid, this holds where
several nodes share one temporary folder from different pid namespaces (pods).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

PREFIX = "ainode-metrics-"
LOCK = ".owner.lock"

log = logging.getLogger(__name__)

_held: list[BinaryIO] = []
"""The lock files of the directories this process owns, open (so locked) until it exits."""


def make_metrics_dir() -> Path:
    """A new, empty directory for this process's tree, after removing those left by dead ones."""
    parent = Path(tempfile.gettempdir())
    for stale in _orphans(parent):
        shutil.rmtree(stale, ignore_errors=True)
        log.info("removed %s, left by a node that is no longer running", stale)
    making = Path(tempfile.mkdtemp(prefix=f".{PREFIX}", dir=parent))
    lock = (making / LOCK).open("wb")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new: nobody else can hold it
    _held.append(lock)
    made = parent / making.name.removeprefix(".")
    making.rename(made)  # found by other nodes only once locked
    return made


def _orphans(parent: Path) -> list[Path]:
    """This user's metrics directories whose owner no longer runs (older ones, without a lock
    file, are left alone)."""
    found = []
    for path in parent.glob(f"{PREFIX}*"):
        with contextlib.suppress(OSError):
            if path.stat().st_uid == os.getuid() and _abandoned(path / LOCK):
                found.append(path)
    return found


def _abandoned(lock_path: Path) -> bool:
    with lock_path.open("rb") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its owner runs
        return True
