"""The node's processes as its main process records them (`<storage>/.processes.json`): the
HTTP process reads the file to say which are alive, which serve, and what each worker runs."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, TypeAdapter
from sqlalchemy import Engine, select

from node.store.db.models import Job, WorkState

PROCESSES_FILE = ".processes.json"


class RecordedProcess(BaseModel):
    name: str
    """`main` (scheduler, dispatcher and the first receiver), `receiver-N`, `worker-N`, `http`."""
    pid: int
    ready: bool
    """The process serves (the main process's record, updated as its children report)."""


class ProcessStatus(RecordedProcess):
    alive: bool
    job: int | None = None
    """The job a worker runs now."""


_RECORDS = TypeAdapter(list[RecordedProcess])


def record_processes(storage: Path, processes: list[RecordedProcess]) -> None:
    """Write the records in one rename (a reader never sees half a file)."""
    target = storage / PROCESSES_FILE
    temp = target.with_suffix(f".{os.getpid()}")
    temp.write_bytes(_RECORDS.dump_json(processes))
    os.replace(temp, target)


def process_statuses(storage: Path, engine: Engine) -> list[ProcessStatus]:
    """Each recorded process, alive or not, with the job a worker holds the lease of."""
    try:
        recorded = _RECORDS.validate_json((storage / PROCESSES_FILE).read_bytes())
    except (OSError, ValueError):  # none yet, or written by an older version: restarted soon
        return []
    with engine.connect() as conn:
        running = conn.execute(
            select(Job.lease_owner, Job.id).where(Job.state == WorkState.RUNNING)
        ).all()
    jobs = {str(owner).rpartition("-")[2]: job_id for owner, job_id in running}
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
