"""Dispatch rows are created with the job's success, in the same transaction."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from node.db.models import Dispatch, JobState, utcnow


def create_dispatches(
    conn: Connection,
    job_id: int,
    destinations: Sequence[str],
    objects: Sequence[Path],
    max_attempts: int,
    priority: int = 1,
) -> None:
    """Queue the sending of `objects` to each destination (again, if the job ran before)."""
    if not objects or not destinations:
        return
    now = utcnow()
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    rows = [
        {
            "job_id": job_id,
            "destination": destination,
            "objects": json.dumps([str(p) for p in objects]),
            "state": JobState.QUEUED,
            "attempts": 0,
            "max_attempts": max_attempts,
            "priority": priority,
            "run_after": now,
            "created_at": now,
        }
        for destination in dict.fromkeys(destinations)
    ]
    insert = dialect.insert(Dispatch).values(rows)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["job_id", "destination"],
            set_={
                "objects": insert.excluded.objects,
                "state": JobState.QUEUED,
                "attempts": 0,
                "max_attempts": max_attempts,
                "priority": priority,
                "status": None,
                "error": None,
                "run_after": now,
                "finished_at": None,
            },
        )
    )
