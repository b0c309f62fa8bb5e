"""Series completion: decides, from the database alone, when a series has stopped arriving.

A receiving series is complete when no association that delivered it is still open and either
- no instance of it arrived for `quiet_seconds`, or
- an association that delivered it was cleanly released after its last instance, at least
  `release_grace_seconds` ago (the sender said it was done; the grace lets a sender that
  opens one association per image keep going).
An aborted association is no such signal: the quiet period applies. State lives in the database,
so completion survives a restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import CompletionSettings
from node.ops.metrics import COMPLETION_DELAY
from node.store.db.models import Association, Series, SeriesAssociation, SeriesState, Study, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompletedSeries:
    """A series revision that just became complete."""

    series_id: int
    series_instance_uid: str
    revision: int
    instance_count: int


class SeriesCompletionTracker:
    """Finds receiving series whose completion rule holds and marks them complete."""

    def __init__(self, sessions: sessionmaker[Session], settings: CompletionSettings) -> None:
        self._sessions = sessions
        self._quiet = timedelta(seconds=settings.quiet_seconds)
        self._grace = timedelta(seconds=settings.release_grace_seconds)

    def sweep(self, now: datetime | None = None) -> list[CompletedSeries]:
        """Complete every series whose rule holds at `now`; return them."""
        now = now or utcnow()
        open_delivery = exists().where(
            SeriesAssociation.series_id == Series.id,
            SeriesAssociation.association_id == Association.id,
            Association.closed_at.is_(None),
        )
        due = or_(
            Series.last_received_at <= now - self._quiet,
            and_(
                Series.released_at.is_not(None),
                Series.released_at >= Series.last_received_at,
                Series.released_at <= now - self._grace,
            ),
        )
        completed: list[CompletedSeries] = []
        with self._sessions.begin() as session:
            candidates = session.execute(
                select(
                    Series.id,
                    Series.series_instance_uid,
                    Series.revision,
                    Series.instance_count,
                    Series.last_received_at,
                )
                .where(Series.state == SeriesState.RECEIVING, due, ~open_delivery)
                .with_for_update(skip_locked=True)
            ).all()
            for series_id, uid, revision, count, last_received in candidates:
                COMPLETION_DELAY.observe((now - last_received).total_seconds())
                session.execute(
                    update(Series)
                    .where(Series.id == series_id, Series.revision == revision)
                    .values(state=SeriesState.COMPLETE, completed_at=now)
                )
                completed.append(CompletedSeries(series_id, uid, revision, count))
        for series in completed:
            log.info(
                "series complete: %s revision %d, %d instances",
                series.series_instance_uid,
                series.revision,
                series.instance_count,
            )
        return completed


class StudyCompletionTracker:
    """A study is complete when all its series are and none received anything for
    `study_quiet_seconds`; a new arrival reopens it."""

    def __init__(self, sessions: sessionmaker[Session], settings: CompletionSettings) -> None:
        self._sessions = sessions
        self._quiet = timedelta(seconds=settings.study_quiet_seconds)

    def sweep(self, now: datetime | None = None) -> list[int]:
        """Reopen studies with a receiving series; complete quiet ones; return their ids."""
        now = now or utcnow()
        receiving = exists().where(
            Series.study_id == Study.id, Series.state == SeriesState.RECEIVING
        )
        last_arrival = (
            select(func.max(Series.last_received_at))
            .where(Series.study_id == Study.id)
            .scalar_subquery()
        )
        with self._sessions.begin() as session:
            session.execute(
                update(Study)
                .where(Study.state == SeriesState.COMPLETE, receiving)
                .values(state=SeriesState.RECEIVING, completed_at=None)
            )
            due = (
                session.execute(
                    select(Study.id).where(
                        Study.state == SeriesState.RECEIVING,
                        ~receiving,
                        last_arrival <= now - self._quiet,
                    )
                )
                .scalars()
                .all()
            )
            if due:
                session.execute(
                    update(Study)
                    .where(Study.id.in_(due))
                    .values(state=SeriesState.COMPLETE, completed_at=now)
                )
        for study_id in due:
            log.info("study %d complete", study_id)
        return list(due)
