"""The catalog: what was received, recorded in the database in the same breath as it is stored.

It keeps studies, series (with the metadata routing needs), instances and the associations that
delivered them. Series completion reads what the catalog writes; it never reaches into the SCP.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import (
    Connection,
    Engine,
    ScalarSelect,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)

from node.store.db.group_commit import GroupCommit
from node.store.db.models import (
    STUDY_KEYWORDS,
    Association,
    Embedding,
    Instance,
    Series,
    SeriesAssociation,
    SeriesState,
    Source,
    Study,
    utcnow,
)
from node.store.db.prepared import PreparedStatement
from node.store.db.upsert import insert_into
from node.store.storage import InstanceKey

HOST = socket.gethostname()
"""This host, as the associations its processes hold name it."""


class InstanceMetadata(Protocol):
    """What the catalog records of a received instance (ingest reads it from the bytes)."""

    @property
    def key(self) -> InstanceKey: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def instance_number(self) -> int | None: ...
    @property
    def rows(self) -> int | None: ...
    @property
    def columns(self) -> int | None: ...
    @property
    def bits_allocated(self) -> int | None: ...
    @property
    def number_of_frames(self) -> int | None: ...
    @property
    def study_fields(self) -> dict[str, object]:
        """Study columns (`STUDY_KEYWORDS`), read when a series is created."""

    @property
    def series_fields(self) -> dict[str, object]:
        """Series columns, read when a series is created."""


@dataclass(frozen=True)
class AssociationRecord:
    """An association as the catalog keeps it (written with its first instance)."""

    id: str
    calling_ae: str
    called_ae: str
    peer_address: str | None
    source: Source = Source.DIMSE


@dataclass(frozen=True)
class Receipt:
    """How an instance reached the node."""

    association_id: str
    calling_ae: str
    called_ae: str
    transfer_syntax_uid: str
    size_bytes: int
    received_at: datetime
    source: Source = Source.DIMSE
    sha256: str | None = None
    """Of the file as stored (None when the bytes were already there: a re-send)."""


@dataclass(frozen=True)
class Recorded:
    """What recording an instance changed."""

    series_id: int
    revision: int
    new_instance: bool
    opened_revision: bool


class Catalog:
    """Database writes of the receive path: short Core transactions, shared by instances
    that arrive together (`GroupCommit`).

    The hot path (a new instance of a series that is receiving) is two statements: touch the
    series and count the instance in, insert the instance. A duplicate is counted out again.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._group = GroupCommit(engine)
        # Compiled once: building and compiling statements per instance costs more than
        # running them, and the hot four run on the DBAPI connection (`PreparedStatement`).
        self._touch_series = PreparedStatement(
            update(Series)
            .where(
                Series.series_instance_uid == bindparam("b_series_uid"),
                Series.state == SeriesState.RECEIVING,
            )
            .values(last_received_at=bindparam("b_now"), instance_count=Series.instance_count + 1)
            .returning(Series.id, Series.revision),
            engine.dialect,
        )
        self._insert_instance = PreparedStatement(
            insert_into(engine, Instance).on_conflict_do_nothing().returning(Instance.id),
            engine.dialect,
            column_keys=INSTANCE_COLUMNS,
        )
        self._count_instance = PreparedStatement(
            update(Series)
            .where(Series.id == bindparam("b_series_id"))
            .values(instance_count=Series.instance_count + bindparam("b_delta")),
            engine.dialect,
        )
        self._link = PreparedStatement(
            insert_into(engine, SeriesAssociation).on_conflict_do_nothing(),
            engine.dialect,
            column_keys=("series_id", "association_id"),
        )
        self._insert_study = _insert_or_complete_study(engine)
        self._insert_series = insert_into(engine, Series).on_conflict_do_nothing()

    def open_association(
        self, association_id: str, calling_ae: str, called_ae: str, peer_address: str | None
    ) -> None:
        record = AssociationRecord(association_id, calling_ae, called_ae, peer_address)
        self._group.run(lambda conn: _insert_association(conn, record))

    def close_association(
        self,
        association_id: str,
        released: bool,
        instances: int,
        audit: Callable[[Connection], None] | None = None,
    ) -> None:
        """Mark an association closed; a clean release stamps the series it delivered.
        `audit` appends its audit event in the same transaction."""

        def work(conn: Connection) -> None:
            self._close_association(conn, association_id, released, instances)
            if audit is not None:
                audit(conn)

        self._group.run(work)

    def _close_association(
        self, conn: Connection, association_id: str, released: bool, instances: int
    ) -> None:
        now = utcnow()
        conn.execute(
            update(Association)
            .where(Association.id == association_id)
            .values(closed_at=now, released=released, instances_received=instances)
        )
        if released:
            delivered = select(SeriesAssociation.series_id).where(
                SeriesAssociation.association_id == association_id
            )
            conn.execute(
                update(Series)
                .where(Series.id.in_(delivered), Series.state == SeriesState.RECEIVING)
                .values(released_at=now)
            )

    def close_stale_associations(self, pids: list[int] | None = None) -> int:
        """Close associations left open on this host by processes that died (all, or those
        of `pids`)."""
        statement = update(Association).where(
            Association.closed_at.is_(None),
            or_(Association.host == HOST, Association.host.is_(None)),
        )
        if pids is not None:
            statement = statement.where(Association.pid.in_(pids))
        with self.engine.begin() as conn:
            return conn.execute(statement.values(closed_at=utcnow(), released=False)).rowcount

    def close_orphaned_associations(self, held: Callable[[str, int, datetime], bool]) -> int:
        """Close the open associations whose holder `held(host, pid, opened_at)` says is gone
        (a row of an older version counts as this host's)."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(
                    Association.id, Association.host, Association.pid, Association.opened_at
                ).where(Association.closed_at.is_(None))
            ).all()
            gone = [row.id for row in rows if not held(row.host or HOST, row.pid, row.opened_at)]
            if not gone:
                return 0
            return conn.execute(
                update(Association)
                .where(Association.id.in_(gone), Association.closed_at.is_(None))
                .values(closed_at=utcnow(), released=False)
            ).rowcount

    def record_instance(
        self,
        meta: InstanceMetadata,
        receipt: Receipt,
        content_changed: bool,
        link: bool,
        opening: AssociationRecord | None = None,
    ) -> Recorded:
        """Record a stored instance, its series and study, atomically (and `opening`, the
        association that delivered it, when this is its first instance).

        `content_changed` is False when identical bytes were already stored: such a re-send
        neither counts twice nor reopens a completed series. `link` records that this
        association delivered the series (needed once per association and series).
        Concurrent calls share a transaction (see `GroupCommit`).
        """

        def work(conn: Connection) -> Recorded:
            if opening is not None:
                _insert_association(conn, opening)
            return self._record_instance(conn, meta, receipt, content_changed, link)

        return self._group.run(work)

    def _record_instance(
        self,
        conn: Connection,
        meta: InstanceMetadata,
        receipt: Receipt,
        content_changed: bool,
        link: bool,
    ) -> Recorded:
        touched = self._touch_series.first(
            conn, {"b_series_uid": meta.key.series_uid, "b_now": receipt.received_at}
        )
        opened = False
        counted = touched is not None  # the touch counts the instance in, on the hot path
        if touched is None:
            touched, opened = self._series_for_arrival(conn, meta, receipt, content_changed)
            link = True
        series_id, revision = touched
        values = _instance_values(meta, receipt, series_id, revision)
        inserted = self._insert_instance.first(conn, values) is not None
        if not inserted and content_changed:
            self._replace_instance(conn, meta.key.sop_instance_uid, values)  # recounts
        elif inserted != counted:
            delta = 1 if inserted else -1
            self._count_instance.first(conn, {"b_series_id": series_id, "b_delta": delta})
        if link:
            self._link.first(
                conn, {"series_id": series_id, "association_id": receipt.association_id}
            )
        return Recorded(series_id, revision, inserted, opened)

    def _series_for_arrival(
        self, conn: Connection, meta: InstanceMetadata, receipt: Receipt, content_changed: bool
    ) -> tuple[tuple[int, int], bool]:
        """The slow path: create study and series, or reopen a completed series."""
        now = receipt.received_at
        conn.execute(
            self._insert_study,
            {
                "study_instance_uid": meta.key.study_uid,
                **meta.study_fields,
                "first_received_at": now,
            },
        )
        study_id = conn.execute(
            select(Study.id).where(Study.study_instance_uid == meta.key.study_uid)
        ).scalar_one()
        conn.execute(
            self._insert_series,
            {
                "study_id": study_id,
                "series_instance_uid": meta.key.series_uid,
                "revision": 1,
                "state": SeriesState.RECEIVING,
                "instance_count": 0,
                "routed_revision": 0,
                "first_received_at": now,
                "last_received_at": now,
                "calling_ae": receipt.calling_ae,
                "called_ae": receipt.called_ae,
                "source": receipt.source,
                **meta.series_fields,
            },
        )
        series_id, revision, state = conn.execute(
            select(Series.id, Series.revision, Series.state)
            .where(Series.series_instance_uid == meta.key.series_uid)
            .with_for_update()
        ).one()
        if state == SeriesState.RECEIVING or not content_changed:
            return (series_id, revision), False
        conn.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(
                revision=revision + 1,
                state=SeriesState.RECEIVING,
                last_received_at=now,
                released_at=None,
                completed_at=None,
            )
        )
        return (series_id, revision + 1), True

    def _replace_instance(
        self, conn: Connection, sop_instance_uid: str, values: dict[str, object]
    ) -> None:
        """New bytes under a known SOP Instance UID (possibly moved to another series)."""
        previous_series = conn.execute(
            select(Instance.series_id).where(Instance.sop_instance_uid == sop_instance_uid)
        ).scalar_one()
        conn.execute(
            update(Instance).where(Instance.sop_instance_uid == sop_instance_uid).values(values)
        )
        for affected in {previous_series, values["series_id"]}:
            count = select(func.count()).where(Instance.series_id == affected).scalar_subquery()
            conn.execute(update(Series).where(Series.id == affected).values(instance_count=count))


def _insert_or_complete_study(engine: Engine) -> Any:
    """A new study; one that exists (a prior's row, made before its instances arrived) gets
    the attributes it lacks."""
    statement = insert_into(engine, Study)
    return statement.on_conflict_do_update(
        index_elements=[Study.study_instance_uid],
        set_={
            column: func.coalesce(getattr(Study, column), statement.excluded[column])
            for column in STUDY_KEYWORDS
        },
    )


def _insert_association(conn: Connection, record: AssociationRecord) -> None:
    conn.execute(
        insert(Association).values(
            id=record.id,
            calling_ae=record.calling_ae,
            called_ae=record.called_ae,
            peer_address=record.peer_address,
            source=record.source,
            pid=os.getpid(),
            host=HOST,
            opened_at=utcnow(),
            released=False,
            instances_received=0,
        )
    )


INSTANCE_COLUMNS = (
    "series_id",
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "instance_number",
    "rows",
    "columns",
    "bits_allocated",
    "number_of_frames",
    "path",
    "size_bytes",
    "sha256",
    "revision",
    "calling_ae",
    "association_id",
    "received_at",
)
"""The columns the receive path fills in an instance row (`_instance_values`)."""


def _instance_values(
    meta: InstanceMetadata, receipt: Receipt, series_id: int, revision: int
) -> dict[str, object]:
    return {
        "series_id": series_id,
        "sop_instance_uid": meta.key.sop_instance_uid,
        "sop_class_uid": meta.sop_class_uid,
        "transfer_syntax_uid": receipt.transfer_syntax_uid,
        "instance_number": meta.instance_number,
        "rows": meta.rows,
        "columns": meta.columns,
        "bits_allocated": meta.bits_allocated,
        "number_of_frames": meta.number_of_frames,
        "path": str(meta.key.relative_path),
        "size_bytes": receipt.size_bytes,
        "sha256": receipt.sha256,
        "revision": revision,
        "calling_ae": receipt.calling_ae,
        "association_id": receipt.association_id,
        "received_at": receipt.received_at,
    }


def distance_of(series_id: object, revision: object) -> ScalarSelect[float | None]:
    """The input guard's distance of a series revision (the farthest, where several embedding
    pipelines scored it; written by `node.work.guard`) as a SQL expression, of values or of an
    enclosing query's columns (`Series.id`, `Series.revision`)."""
    return (
        select(func.max(Embedding.guard_distance))
        .where(Embedding.series_id == series_id, Embedding.revision == revision)
        .scalar_subquery()
    )
