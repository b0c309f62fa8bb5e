"""The node's processes as its main process records them (`<storage>/.processes.json`): the
HTTP process reads the file to say which are alive and what each worker runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import Engine, select

from node.store.db.models import Job, WorkState

PROCESSES_FILE = ".processes.json"


class ProcessStatus(BaseModel):
    name: str
    """`main` (scheduler, dispatcher and the first receiver), `receiver`, `worker-N`, `http`."""
    pid: int
    alive: bool
    job: int | None = None
    """The job a worker runs now."""


def record_processes(storage: Path, processes: dict[str, int]) -> None:
    """Write name -> pid in one rename (a reader never sees half a file)."""
    target = storage / PROCESSES_FILE
    temp = target.with_suffix(f".{os.getpid()}")
    temp.write_text(json.dumps(processes), encoding="utf-8")
    os.replace(temp, target)


def process_statuses(storage: Path, engine: Engine) -> list[ProcessStatus]:
    """Each recorded process, alive or not, with the job a worker holds the lease of."""
    try:
        recorded: dict[str, int] = json.loads((storage / PROCESSES_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return []
    with engine.connect() as conn:
        running = conn.execute(
            select(Job.lease_owner, Job.id).where(Job.state == WorkState.RUNNING)
        ).all()
    jobs = {str(owner).rpartition("-")[2]: job_id for owner, job_id in running}
    return [
        ProcessStatus(
            name=name,
            pid=pid,
            alive=_alive(pid),
            job=jobs.get(str(pid)) if name.startswith("worker") else None,
        )
        for name, pid in recorded.items()
    ]


def _alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
