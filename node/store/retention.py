"""Retention: delete studies older than `storage.retention_days` whose jobs have all finished.

Rows go first (in one transaction, cascading to series, instances and jobs), files after: a
crash in between leaves only unreferenced files, which the next sweep does not need.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, and_, delete, exists, select

from node.store.db.models import Association, Job, Series, SeriesState, Study, utcnow
from node.store.leased import FINISHED

log = logging.getLogger(__name__)


class RetentionSweeper:
    def __init__(self, engine: Engine, storage: Path, retention_days: float) -> None:
        self._engine = engine
        self._storage = storage
        self._age = timedelta(days=retention_days)

    def sweep(self, now: datetime | None = None) -> list[str]:
        """Delete every expired study; return their Study Instance UIDs."""
        cutoff = (now or utcnow()) - self._age
        unfinished = exists().where(
            Job.series_id == Series.id, Series.study_id == Study.id, Job.state.not_in(FINISHED)
        )
        receiving = exists().where(
            Series.study_id == Study.id, Series.state == SeriesState.RECEIVING
        )
        with self._engine.begin() as conn:
            expired = conn.execute(
                select(Study.id, Study.study_instance_uid).where(
                    Study.state == SeriesState.COMPLETE,
                    Study.completed_at < cutoff,
                    ~unfinished,
                    ~receiving,
                )
            ).all()
            if expired:
                conn.execute(delete(Study).where(Study.id.in_([row.id for row in expired])))
            conn.execute(
                delete(Association).where(
                    and_(Association.closed_at.is_not(None), Association.closed_at < cutoff)
                )
            )
        for _, study_uid in expired:
            shutil.rmtree(self._storage / study_uid, ignore_errors=True)
            log.info("retention: study %s deleted", study_uid)
        return [uid for _, uid in expired]
