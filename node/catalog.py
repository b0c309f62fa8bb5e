"""The catalog: what was received, recorded in the database in the same breath as it is stored.

It keeps studies, series (with the metadata routing needs), instances and the associations that
delivered them. Series completion reads what the catalog writes; it never reaches into the SCP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

from pydicom import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import (
    Association,
    Instance,
    Series,
    SeriesAssociation,
    SeriesState,
    Study,
    utcnow,
)
from node.storage import InstanceKey


@dataclass(frozen=True)
class InstanceMetadata:
    """What the catalog keeps of one received instance (no patient identifiers)."""

    key: InstanceKey
    sop_class_uid: str
    instance_number: int | None
    modality: str | None
    body_part_examined: str | None
    study_description: str | None
    study_date: str | None
    series_description: str | None
    protocol_name: str | None
    image_type: str | None
    slice_thickness: float | None
    convolution_kernel: str | None
    manufacturer: str | None
    series_number: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceMetadata:
        """Read the metadata of `ds`; raises InvalidUID for a UID that cannot be stored."""
        key = InstanceKey.validated(
            ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID")
        )
        return cls(
            key=key,
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            instance_number=_as_int(ds.get("InstanceNumber")),
            modality=_as_text(ds.get("Modality")),
            body_part_examined=_as_text(ds.get("BodyPartExamined")),
            study_description=_as_text(ds.get("StudyDescription")),
            study_date=_as_text(ds.get("StudyDate")),
            series_description=_as_text(ds.get("SeriesDescription")),
            protocol_name=_as_text(ds.get("ProtocolName")),
            image_type=_as_text(ds.get("ImageType")),
            slice_thickness=_as_float(ds.get("SliceThickness")),
            convolution_kernel=_as_text(ds.get("ConvolutionKernel")),
            manufacturer=_as_text(ds.get("Manufacturer")),
            series_number=_as_int(ds.get("SeriesNumber")),
        )


@dataclass(frozen=True)
class Receipt:
    """How an instance reached the node."""

    association_id: str
    calling_ae: str
    called_ae: str
    transfer_syntax_uid: str
    size_bytes: int
    received_at: datetime


@dataclass(frozen=True)
class Recorded:
    """What recording an instance changed."""

    series_id: int
    revision: int
    new_instance: bool
    opened_revision: bool


class Catalog:
    """Database writes of the receive path: one short transaction per event."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def open_association(
        self, association_id: str, calling_ae: str, called_ae: str, peer_address: str | None
    ) -> None:
        with self._sessions.begin() as session:
            session.add(
                Association(
                    id=association_id,
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    peer_address=peer_address,
                    pid=os.getpid(),
                    opened_at=utcnow(),
                )
            )

    def close_association(self, association_id: str, released: bool, instances: int) -> None:
        """Mark an association closed; a clean release stamps the series it delivered."""
        now = utcnow()
        with self._sessions.begin() as session:
            session.execute(
                update(Association)
                .where(Association.id == association_id)
                .values(closed_at=now, released=released, instances_received=instances)
            )
            if released:
                delivered = select(SeriesAssociation.series_id).where(
                    SeriesAssociation.association_id == association_id
                )
                session.execute(
                    update(Series)
                    .where(Series.id.in_(delivered), Series.state == SeriesState.RECEIVING)
                    .values(released_at=now)
                )

    def close_stale_associations(self, pids: list[int] | None = None) -> int:
        """Close associations left open by processes that died (all, or those of `pids`)."""
        statement = update(Association).where(Association.closed_at.is_(None))
        if pids is not None:
            statement = statement.where(Association.pid.in_(pids))
        with self._sessions.begin() as session:
            result = session.execute(statement.values(closed_at=utcnow(), released=False))
            return result.rowcount

    def record_instance(
        self, meta: InstanceMetadata, receipt: Receipt, content_changed: bool
    ) -> Recorded:
        """Record a stored instance, its series and study, atomically.

        `content_changed` is False when identical bytes were already stored: such a
        re-send neither counts twice nor reopens a completed series.
        """
        now = receipt.received_at
        with self._sessions.begin() as session:
            study_id = self._study_id(session, meta, now)
            series = self._locked_series(session, meta, study_id, receipt, now)
            opened = content_changed and series.state == SeriesState.COMPLETE
            if opened:
                series.revision += 1
                series.state = SeriesState.RECEIVING
                series.released_at = None
                series.completed_at = None
            existing = session.execute(
                select(Instance).where(Instance.sop_instance_uid == meta.key.sop_instance_uid)
            ).scalar_one_or_none()
            if existing is None:
                session.add(_new_instance(meta, receipt, series))
            elif content_changed or existing.series_id != series.id:
                existing.series_id = series.id
                existing.path = str(meta.key.relative_path)
                existing.size_bytes = receipt.size_bytes
                existing.transfer_syntax_uid = receipt.transfer_syntax_uid
                existing.revision = series.revision
                existing.received_at = now
            if series.state == SeriesState.RECEIVING:
                series.last_received_at = now
                _insert_ignore(
                    session,
                    SeriesAssociation,
                    {"series_id": series.id, "association_id": receipt.association_id},
                )
            session.flush()
            series.instance_count = session.execute(
                select(func.count()).where(Instance.series_id == series.id)
            ).scalar_one()
            return Recorded(series.id, series.revision, existing is None, opened)

    def _study_id(self, session: Session, meta: InstanceMetadata, now: datetime) -> int:
        _insert_ignore(
            session,
            Study,
            {
                "study_instance_uid": meta.key.study_uid,
                "study_description": meta.study_description,
                "study_date": meta.study_date,
                "first_received_at": now,
                "last_received_at": now,
            },
        )
        study_id = session.execute(
            select(Study.id).where(Study.study_instance_uid == meta.key.study_uid)
        ).scalar_one()
        session.execute(update(Study).where(Study.id == study_id).values(last_received_at=now))
        return study_id

    def _locked_series(
        self,
        session: Session,
        meta: InstanceMetadata,
        study_id: int,
        receipt: Receipt,
        now: datetime,
    ) -> Series:
        _insert_ignore(
            session,
            Series,
            {
                "study_id": study_id,
                "series_instance_uid": meta.key.series_uid,
                "revision": 1,
                "state": SeriesState.RECEIVING,
                "modality": meta.modality,
                "sop_class_uid": meta.sop_class_uid,
                "body_part_examined": meta.body_part_examined,
                "series_description": meta.series_description,
                "protocol_name": meta.protocol_name,
                "image_type": meta.image_type,
                "slice_thickness": meta.slice_thickness,
                "convolution_kernel": meta.convolution_kernel,
                "manufacturer": meta.manufacturer,
                "series_number": meta.series_number,
                "instance_count": 0,
                "calling_ae": receipt.calling_ae,
                "called_ae": receipt.called_ae,
                "first_received_at": now,
                "last_received_at": now,
            },
        )
        return session.execute(
            select(Series)
            .where(Series.series_instance_uid == meta.key.series_uid)
            .with_for_update()
        ).scalar_one()


def _new_instance(meta: InstanceMetadata, receipt: Receipt, series: Series) -> Instance:
    return Instance(
        series_id=series.id,
        sop_instance_uid=meta.key.sop_instance_uid,
        sop_class_uid=meta.sop_class_uid,
        transfer_syntax_uid=receipt.transfer_syntax_uid,
        instance_number=meta.instance_number,
        path=str(meta.key.relative_path),
        size_bytes=receipt.size_bytes,
        revision=series.revision,
        calling_ae=receipt.calling_ae,
        association_id=receipt.association_id,
        received_at=receipt.received_at,
    )


def _insert_ignore(session: Session, model: type, values: dict[str, object]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(model).values(**values).on_conflict_do_nothing())


def _as_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip() or None


def _as_float(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _as_int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
