"""The workers on other hosts as the worker API last saw them: noted when one claims or renews
(at most every `NOTE_SECONDS` per worker: a claim loop must not become a write loop), listed
with the job each holds for status, the API and the dashboard."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import Engine, select, update

from node.store.db.models import Job, RemoteWorker, WorkState, utcnow
from node.store.db.upsert import upsert

NOTE_SECONDS = 10.0
Said = tuple[tuple[str, ...], str]
"""What a claim says of the worker: its pipelines and its device."""


class RemoteWorkerStatus(BaseModel):
    owner: str
    """`<credential>/<worker>`."""
    pipelines: list[str]
    device: str
    seen_at: datetime
    job: int | None = None
    """The job it holds the lease of now."""


class Sightings:
    """Notes the workers that call, each at most every `NOTE_SECONDS` (one per HTTP process)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._noted: dict[str, tuple[float, Said | None]] = {}

    def claimed(self, owner: str, pipelines: Sequence[str], device: str) -> None:
        """The worker asked for work with these pipelines on this device."""
        if not self._due(owner, (tuple(pipelines), device)):
            return
        row = {"owner": owner, "pipelines": list(pipelines), "device": device, "seen_at": utcnow()}
        with self._engine.begin() as conn:
            upsert(conn, RemoteWorker, row, ["owner"])

    def renewed(self, owner: str) -> None:
        """The worker renewed a lease (it is busy, not gone)."""
        if not self._due(owner, None):
            return
        with self._engine.begin() as conn:
            conn.execute(
                update(RemoteWorker).where(RemoteWorker.owner == owner).values(seen_at=utcnow())
            )

    def _due(self, owner: str, said: Said | None) -> bool:
        """Whether to write: the worker not noted for `NOTE_SECONDS`, or saying something
        new (`said`: its pipelines and device; None for a renewal, which says nothing)."""
        now = time.monotonic()
        with self._lock:
            noted_at, before = self._noted.get(owner, (-NOTE_SECONDS, None))
            fresh = now - noted_at < NOTE_SECONDS
            if fresh and (said is None or said == before):
                return False
            self._noted[owner] = (now, said if said is not None else before)
        return True


def list_remote_workers(engine: Engine) -> list[RemoteWorkerStatus]:
    """Every remote worker seen, most recently seen first, with the job it runs."""
    table = RemoteWorker
    with engine.connect() as conn:
        workers = conn.execute(
            select(table.owner, table.pipelines, table.device, table.seen_at).order_by(
                table.seen_at.desc(), table.owner
            )
        ).all()
        running = dict(
            conn.execute(
                select(Job.lease_owner, Job.id).where(
                    Job.state == WorkState.RUNNING,
                    Job.lease_owner.in_([w.owner for w in workers]),
                )
            ).all()
        )
    return [
        RemoteWorkerStatus(
            owner=w.owner,
            pipelines=list(w.pipelines),
            device=w.device,
            seen_at=w.seen_at,
            job=running.get(w.owner),
        )
        for w in workers
    ]
