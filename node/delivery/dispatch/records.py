"""Dispatches as `ainode status` and the API list them: a read of the table, without the
senders' network stack."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from node.store.db.models import CommitmentState, Dispatch, WorkState
from node.store.leased import newest


@dataclass(frozen=True)
class DispatchView:
    """A dispatch as `ainode status --json` shows it (`dispatches` list)."""

    id: int
    job_id: int
    destination: str
    state: WorkState
    attempts: int
    status: str | None
    error: str | None
    objects: list[str]
    """The job's result files, queued for every destination."""
    sent: list[str] | None
    """The SOP Instance UIDs this destination took (None until sent)."""
    commitment: CommitmentState | None
    """pending, committed or failed where the destination is asked for storage commitment
    (`peers.NAME.commitment`); delivered only when committed."""
    created_at: datetime
    finished_at: datetime | None


def list_dispatches(engine: Engine, limit: int = 200) -> list[DispatchView]:
    """Newest first."""
    return newest(engine, Dispatch, DispatchView, limit)
