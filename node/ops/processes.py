"""The node's processes as each process tree's main process records them
(`<storage>/.processes.json`, or `.processes-<roles>.json` for a tree started with some roles):
the HTTP process reads them to say which are alive, which serve, and what each worker runs;
`ainode health` reads how recently a tree touched its table and whether all of it serves."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, TypeAdapter

from node.roles import ServiceRole

PROCESSES_FILE = ".processes.json"


class RecordedProcess(BaseModel):
    name: str
    """`main` (scheduler, dispatcher and the first receiver), `receiver-N`, `worker-N`, `http`
    and `http-N`."""
    pid: int
    ready: bool
    """The process serves (the main process's record, updated as its children report)."""
    roles: list[str] = []
    """The roles of the tree (the main process's record)."""
    coordinating: bool | None = None
    """Whether the tree is the active coordinator (None: it has no coordinator role)."""
    host: str = ""
    """The tree's host (the main process's record)."""


class ProcessStatus(RecordedProcess):
    alive: bool
    job: int | None = None
    """The job a worker runs now."""


_RECORDS = TypeAdapter(list[RecordedProcess])


STALE_TABLE_SECONDS = 60.0
"""A table not touched for this long is a tree's that died without a word: it is removed."""


def table_path(storage: Path, roles: Collection[str], pid: int | None = None) -> Path:
    """Where a tree with these roles records its processes: one file for a tree of every
    role, one per host and main process for a tree of some (several may share a store)."""
    if frozenset(roles) >= frozenset(ServiceRole):
        return storage / PROCESSES_FILE
    return storage / f"{_prefix(roles)}{socket.gethostname()}-{pid or os.getpid()}.json"


def _prefix(roles: Collection[str]) -> str:
    return f".processes-{'+'.join(sorted(roles))}-"


def record_processes(
    storage: Path, roles: Collection[str], processes: list[RecordedProcess]
) -> None:
    """Write the records in one rename (a reader never sees half a file)."""
    target = table_path(storage, roles)
    temp = target.with_suffix(f".{os.getpid()}")
    temp.write_bytes(_RECORDS.dump_json(processes))
    os.replace(temp, target)


def mark_alive(storage: Path, roles: Collection[str]) -> None:
    """Touch the tree's table (its main process is alive now), and remove the tables of trees
    that stopped touching theirs."""
    os.utime(table_path(storage, roles))
    for path in storage.glob(".processes*.json"):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > STALE_TABLE_SECONDS:
                path.unlink()


def forget_processes(storage: Path, roles: Collection[str]) -> None:
    """Remove the tree's table at a clean stop (its processes are not down, they are gone)."""
    table_path(storage, roles).unlink(missing_ok=True)


def read_table(path: Path) -> list[RecordedProcess]:
    """A table's records (none where it is missing or written by an older version)."""
    try:
        return _RECORDS.validate_json(path.read_bytes())
    except (OSError, ValueError):
        return []


class TreeHealth(BaseModel):
    alive: bool
    """A tree of these roles on this host touched its table within the allowed time."""
    serving: bool
    """Alive, and every process of every such tree serves."""
    reason: str


def tree_health(storage: Path, roles: Collection[str], stale_seconds: float) -> TreeHealth:
    """Whether the trees started with these roles on this host are alive and serve, and why
    not."""
    if frozenset(roles) >= frozenset(ServiceRole):
        tables = [storage / PROCESSES_FILE]
    else:
        tables = list(storage.glob(f"{_prefix(roles)}{socket.gethostname()}-*.json"))
    fresh = [path for path in tables if _age(path) <= stale_seconds]
    if not fresh:
        reason = f"no process tree with roles {'+'.join(sorted(roles))} runs here"
        return TreeHealth(alive=False, serving=False, reason=reason)
    processes = [process for path in fresh for process in read_table(path)]
    down = [p.name for p in processes if not _alive(p.pid)]
    if down:  # a child is restarted by its main process within a second
        alive = "main" not in down
        return TreeHealth(alive=alive, serving=False, reason=f"down: {', '.join(down)}")
    starting = [p.name for p in processes if not p.ready]
    if starting:
        reason = f"starting: {', '.join(starting)}"
        return TreeHealth(alive=True, serving=False, reason=reason)
    return TreeHealth(alive=True, serving=True, reason="every process serves")


def association_holders(storage: Path) -> Callable[[str, int, datetime], bool]:
    """Whether an association opened at `opened_at` by process `pid` on `host` is still held:
    on this host, by a live process that started before it opened (not a later one that
    reuses the pid); elsewhere, on a host where a process tree still runs, or opened within
    the last minute."""
    here = socket.gethostname()
    hosts = {here} | {
        process.host
        for path in storage.glob(".processes*.json")
        if _age(path) <= STALE_TABLE_SECONDS
        for process in read_table(path)
        if process.host
    }

    recent = datetime.now(UTC) - timedelta(seconds=STALE_TABLE_SECONDS)

    def held(host: str, pid: int, opened_at: datetime) -> bool:
        if host != here:  # a tree there that is just starting has no table yet
            return host in hosts or opened_at > recent
        started = _started_at(pid)
        return started is not None and started <= opened_at + timedelta(seconds=1)

    return held


def _started_at(pid: int) -> datetime | None:
    """When a live process started (None when there is none, or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        booted = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, IndexError, StopIteration, ValueError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return datetime.fromtimestamp(booted + int(fields[19]) / os.sysconf("SC_CLK_TCK"), UTC)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def process_statuses(storage: Path, leases: Mapping[str, int]) -> list[ProcessStatus]:
    """Each recorded process of every tree, alive or not, with the job a worker holds the
    lease of (`leases`: lease owner to job, as `node.flow.queue.running_jobs` gives)."""
    recorded = [
        process for path in sorted(storage.glob(".processes*.json")) for process in read_table(path)
    ]
    jobs = {owner.rpartition("-")[2]: job_id for owner, job_id in leases.items()}
    return [
        ProcessStatus(
            **process.model_dump(),
            alive=_alive(process.pid),
            job=jobs.get(str(process.pid)) if process.name.startswith("worker") else None,
        )
        for process in recorded
    ]


def _alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
