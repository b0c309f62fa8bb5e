"""The fetches table: queueing a fetch, and listing them (`ainode status`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, insert

from node.delivery.fetch.query import FetchQuery
from node.store.db.models import Fetch, WorkState, utcnow
from node.store.leased import newest, queued


@dataclass(frozen=True)
class FetchView:
    """A fetch as `ainode status --json` shows it (`fetches` list)."""

    id: int
    source: str
    query: dict[str, object]
    prior_of: str | None
    state: WorkState
    attempts: int
    studies: list[str]
    instances: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None


def enqueue(
    engine: Engine,
    source: str,
    query: FetchQuery,
    max_attempts: int,
    prior_of: str | None = None,
    claimed_by: str | None = None,
    lease_seconds: float = 0.0,
) -> int:
    """A new fetch: queued for the node, or already leased to `claimed_by` (`ainode fetch`
    runs it itself; the node's fetcher would otherwise take it first)."""
    now = utcnow()
    lease = queued(max_attempts, now)
    if claimed_by is not None:
        lease |= {
            "state": WorkState.RUNNING,
            "attempts": 1,
            "lease_owner": claimed_by,
            "lease_expires_at": now + timedelta(seconds=lease_seconds),
            "started_at": now,
        }
    with engine.begin() as conn:
        return int(
            conn.execute(
                insert(Fetch)
                .values(
                    source=source,
                    query=query.model_dump_json(exclude_none=True),
                    prior_of=prior_of,
                    studies=[],
                    instances=0,
                    **lease,
                )
                .returning(Fetch.id)
            ).scalar_one()
        )


def list_fetches(engine: Engine, limit: int = 200) -> list[FetchView]:
    """Newest first."""
    return newest(engine, Fetch, FetchView, limit, query=json.loads)
