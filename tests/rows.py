"""Rows a test needs in the catalog and the queue, written as the node writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import Engine, insert

from node.db.models import Series, Study, utcnow
from node.outcome import JobOutcome, OutcomeRecorder, ResultSummary


def add_series(engine: Engine, count: int) -> list[int]:
    now = utcnow()
    with engine.begin() as conn:
        study = conn.execute(
            insert(Study)
            .values(study_instance_uid="1.2.3", first_received_at=now)
            .returning(Study.id)
        ).scalar_one()
        return [
            conn.execute(
                insert(Series)
                .values(
                    study_id=study,
                    series_instance_uid=f"1.2.3.{i + 1}",
                    first_received_at=now,
                    last_received_at=now,
                    instance_count=1,
                    routed_revision=0,
                )
                .returning(Series.id)
            ).scalar_one()
            for i in range(count)
        ]


def finish(
    engine: Engine,
    job_id: int,
    owner: str = "w",
    positive: bool = False,
    objects: tuple[Path, ...] = (),
    embedding: np.ndarray | None = None,
    dispatch_attempts: int = 8,
) -> bool:
    """Record a job's success as a worker would."""
    summary = ResultSummary(pipeline="p", version="1.0", positive=positive)
    outcome = JobOutcome(job_id, owner, summary, objects, embedding)
    return OutcomeRecorder(engine, dispatch_attempts).record(outcome)
