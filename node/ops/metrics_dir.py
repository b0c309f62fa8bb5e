"""The directory where every process of one `ainode serve` counts its metrics.

It is made under the system's temporary folder, named with the pid of the `ainode serve` that
owns it, and removed when that process ends. A node killed outright cannot remove it: the next
start removes the directories of this user's nodes whose process is gone, so crashes do not
fill the temporary folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "ainode-metrics-"

log = logging.getLogger(__name__)


def make_metrics_dir() -> Path:
    """A new, empty directory for this process's tree, after removing those left by dead ones."""
    parent = Path(tempfile.gettempdir())
    for stale in _orphans(parent):
        shutil.rmtree(stale, ignore_errors=True)
        log.info("removed %s, left by a node that is no longer running", stale)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))


def _orphans(parent: Path) -> list[Path]:
    """This user's metrics directories whose owning process no longer runs."""
    found = []
    for path in parent.glob(f"{PREFIX}*"):
        owner = _owner_pid(path.name)
        try:
            mine = path.is_dir() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and owner is not None and (owner == os.getpid() or not _running(owner)):
            found.append(path)  # our own pid on it: a container's, reused after a restart
    return found


def _owner_pid(name: str) -> int | None:
    """The pid in `ainode-metrics-<pid>-<random>`; None for older names (left alone)."""
    pid, separator, _ = name.removeprefix(PREFIX).partition("-")
    return int(pid) if separator and pid.isdigit() else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True
