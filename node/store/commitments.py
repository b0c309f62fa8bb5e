"""Storage commitment reports as the catalog records them: the waiting dispatch whose request
a report answers becomes succeeded (every instance sent committed) or is marked failed for
the dispatcher to send again (`node.delivery.dispatch.dispatcher`)."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from sqlalchemy import Engine, and_, or_, select, update

from node.config import ORIGIN
from node.store.db.models import (
    CommitmentState,
    Dispatch,
    Job,
    Series,
    Study,
    WorkState,
    utcnow,
)
from node.store.leased import ERROR_LENGTH


class Answered(enum.Enum):
    """What a report did to its dispatch."""

    UNKNOWN = "unknown"
    """No dispatch to the reporting peer has this Transaction UID."""
    ALREADY = "already"
    """Its dispatch no longer waits (answered before, cancelled, or sent again)."""
    COMMITTED = "committed"
    FAILED = "failed"


@dataclass(frozen=True)
class Recorded:
    """A report's effect on its dispatch (`dispatch` is None when unknown)."""

    answered: Answered
    dispatch: int | None = None
    destination: str | None = None
    study_instance_uid: str | None = None
    committed: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    """Sent and not committed: reported as failed, or not reported at all."""
    error: str | None = None


def record_report(
    engine: Engine,
    peer: tuple[str, Collection[str]],
    transaction_uid: str,
    committed: Collection[str],
    failed: Mapping[str, int],
) -> Recorded:
    """Record a report of `transaction_uid` from `peer` (its AE title, and its names in
    `peers`; a dispatch to `origin` is its when it sent the series): `committed` SOP
    Instance UIDs and `failed` ones with their Failure Reason. An instance sent but named in
    neither list counts as failed."""
    ae_title, names = peer
    with engine.begin() as conn:
        row = conn.execute(
            select(
                Dispatch.id,
                Dispatch.destination,
                Dispatch.state,
                Dispatch.sent,
                Study.study_instance_uid,
            )
            .join(Job, Job.id == Dispatch.job_id)
            .join(Series, Series.id == Job.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(
                Dispatch.transaction_uid == transaction_uid,
                or_(
                    Dispatch.destination.in_(list(names)),
                    and_(Dispatch.destination == ORIGIN, Series.calling_ae == ae_title),
                ),
            )
        ).first()
        if row is None:
            return Recorded(Answered.UNKNOWN)
        which = (row.id, row.destination, row.study_instance_uid)
        if row.state != WorkState.WAITING:
            return Recorded(Answered.ALREADY, *which)
        sent = list(row.sent or [])
        kept = tuple(uid for uid in sent if uid in committed and uid not in failed)
        lost = tuple(uid for uid in sent if uid not in kept)
        waiting = update(Dispatch).where(
            Dispatch.id == row.id,
            Dispatch.state == WorkState.WAITING,
            Dispatch.transaction_uid == transaction_uid,
        )
        if not lost:
            conn.execute(
                waiting.values(
                    state=WorkState.SUCCEEDED,
                    commitment=CommitmentState.COMMITTED,
                    finished_at=utcnow(),
                    error=None,
                )
            )
            return Recorded(Answered.COMMITTED, *which, kept)
        error = _failures(lost, failed, len(sent))
        # Due now: the dispatcher sends it again, or gives it up after its last attempt.
        conn.execute(
            waiting.values(
                commitment=CommitmentState.FAILED, error=error[:ERROR_LENGTH], run_after=utcnow()
            )
        )
        return Recorded(Answered.FAILED, *which, kept, lost, error)


def _failures(lost: tuple[str, ...], failed: Mapping[str, int], sent: int) -> str:
    reasons = [
        f"{uid}: {f'failure reason 0x{failed[uid]:04X}' if uid in failed else 'not in the report'}"
        for uid in lost
    ]
    return f"storage commitment failed for {len(lost)} of {sent} instances: " + "; ".join(reasons)
