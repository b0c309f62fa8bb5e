"""Tables: studies, series (one row per Series Instance UID, with its current revision),
instances and the associations that delivered them (written by `node.store.catalog`); jobs
(`node.flow.queue`, `node.work.outcome`), dispatches (`node.work.outcome`,
`node.delivery.dispatch`) and embeddings (`node.work.outcome`, read by `node.work.embeddings`).
Alembic migrations create them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)
E = TypeVar("E", bound=enum.StrEnum)
AE = String(16)
SENDER = String(64)
"""A calling AE title, or the name of a DICOMweb sender (a token's or a JWT's subject)."""


class Source(enum.StrEnum):
    """How a series reached the node."""

    DIMSE = "dimse"
    DICOMWEB = "dicomweb"
    NODE = "node"
    """The node's own results (SR, SEG), kept beside the study they describe."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: object | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if isinstance(value, datetime) else None


class StateText(TypeDecorator[E]):
    """A state enum stored as its text value (a plain VARCHAR: no database enum type to
    migrate when a state is added), read back as the enum."""

    impl = String(16)
    cache_ok = True

    def __init__(self, states: type[E]) -> None:
        super().__init__()
        self.states = states

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.states(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.states(value)


class TextList(TypeDecorator[list[str]]):
    """A list of names or paths, stored as a JSON array in a TEXT column."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Sequence[str] | None, dialect: Dialect) -> str | None:
        return None if value is None else json.dumps([str(item) for item in value])

    def process_result_value(self, value: str | None, dialect: Dialect) -> list[str] | None:
        return None if value is None else [str(item) for item in json.loads(value)]


class Base(DeclarativeBase):
    pass


class SeriesState(enum.StrEnum):
    """A series is receiving until its completion rule fires, then complete.

    An instance arriving after completion opens the next revision (state back to receiving).
    """

    RECEIVING = "receiving"
    COMPLETE = "complete"


STUDY_KEYWORDS = {
    "study_description": "StudyDescription",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "dicom_study_id": "StudyID",
    "accession_number": "AccessionNumber",
    "referring_physician_name": "ReferringPhysicianName",
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
}
"""Study columns and the attributes they hold (QIDO-RS matches and returns them)."""


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_description: Mapped[str | None] = mapped_column(Text)
    study_date: Mapped[str | None] = mapped_column(Text)
    study_time: Mapped[str | None] = mapped_column(Text)
    dicom_study_id: Mapped[str | None] = mapped_column(Text)
    accession_number: Mapped[str | None] = mapped_column(Text)
    referring_physician_name: Mapped[str | None] = mapped_column(Text)
    patient_id: Mapped[str | None] = mapped_column(Text, index=True)
    patient_name: Mapped[str | None] = mapped_column(Text)
    patient_birth_date: Mapped[str | None] = mapped_column(Text)
    patient_sex: Mapped[str | None] = mapped_column(Text)
    prior_of: Mapped[str | None] = mapped_column(UID)
    """Fetched as a prior of this study (its Study Instance UID): routed only by rules that
    ask for priors."""
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state: Mapped[SeriesState] = mapped_column(
        StateText(SeriesState), default=SeriesState.RECEIVING
    )
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (Index("ix_series_state_last_received", "state", "last_received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[SeriesState] = mapped_column(
        StateText(SeriesState), default=SeriesState.RECEIVING
    )
    modality: Mapped[str | None] = mapped_column(Text)
    sop_class_uid: Mapped[str | None] = mapped_column(Text)
    body_part_examined: Mapped[str | None] = mapped_column(Text)
    series_description: Mapped[str | None] = mapped_column(Text)
    protocol_name: Mapped[str | None] = mapped_column(Text)
    image_type: Mapped[str | None] = mapped_column(Text)
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    convolution_kernel: Mapped[str | None] = mapped_column(Text)
    manufacturer: Mapped[str | None] = mapped_column(Text)
    series_number: Mapped[int | None] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    calling_ae: Mapped[str | None] = mapped_column(SENDER)
    called_ae: Mapped[str | None] = mapped_column(AE)
    source: Mapped[Source] = mapped_column(StateText(Source), server_default=Source.DIMSE.value)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    routed_revision: Mapped[int] = mapped_column(Integer, default=0)
    route_requests: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(Text)
    transfer_syntax_uid: Mapped[str] = mapped_column(Text)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    bits_allocated: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    """Of the file as stored, for `ainode verify` (None in rows older than it)."""
    revision: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(SENDER)
    association_id: Mapped[str | None] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Association(Base):
    """A DICOM association that was accepted; open while `closed_at` is null."""

    __tablename__ = "associations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    calling_ae: Mapped[str] = mapped_column(SENDER)
    called_ae: Mapped[str] = mapped_column(AE)
    source: Mapped[Source] = mapped_column(StateText(Source), server_default=Source.DIMSE.value)
    peer_address: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str | None] = mapped_column(String(255))
    """The host of `pid` (None: recorded before hosts were)."""
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    released: Mapped[bool] = mapped_column(Boolean, default=False)
    instances_received: Mapped[int] = mapped_column(Integer, default=0)


class SeriesAssociation(Base):
    """Which associations delivered instances of which series."""

    __tablename__ = "series_associations"

    series_id: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), primary_key=True
    )
    association_id: Mapped[str] = mapped_column(
        ForeignKey("associations.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class WorkState(enum.StrEnum):
    """States of leased work (jobs, dispatches): queued -> running -> succeeded | failed |
    retrying -> (running ...) | dead; cancelled; a dispatch may wait between running and
    succeeded for its destination's storage commitment. See `node.store.leased`."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRYING = "retrying"
    DEAD = "dead"
    CANCELLED = "cancelled"
    WAITING = "waiting"
    """Done on our side, waiting for the peer's answer until `run_after` (a dispatch for
    the destination's storage commitment report)."""


class CommitmentState(enum.StrEnum):
    """A dispatch's storage commitment (PS3.4 J) by a destination that gives it."""

    PENDING = "pending"
    """Asked (N-ACTION answered), no report yet."""
    COMMITTED = "committed"
    """The destination reported every instance sent as committed."""
    FAILED = "failed"
    """The report named failures, or none came in time: the dispatch is sent again, or is
    dead after its last attempt."""


class LeasedWork:
    """The columns every row of a leased queue has (`node.store.leased.LeasedQueue`)."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    state: Mapped[WorkState] = mapped_column(StateText(WorkState), default=WorkState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(LeasedWork, Base):
    """One pipeline run for one series revision, with where its results go.

    `result` is the JSON of its `node.work.outcome.ResultSummary`."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint(
            "series_id", "revision", "pipeline", name="uq_job_series_revision_pipeline"
        ),
        Index("ix_jobs_claim", "state", "priority", "run_after"),
    )

    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    pipeline: Mapped[str] = mapped_column(String(64))
    destinations: Mapped[list[str]] = mapped_column(TextList, default=list)
    rules: Mapped[list[str]] = mapped_column(TextList, default=list)
    priority_if_positive: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[str | None] = mapped_column(Text)
    notify: Mapped[list[str]] = mapped_column(TextList, default=list, server_default="[]")
    stage: Mapped[str | None] = mapped_column(String(64))
    """What the job does now, or where it stopped (its pipeline's stage names)."""


class Dispatch(LeasedWork, Base):
    """Sending one job's result objects (their paths, relative to the store) to one destination."""

    __tablename__ = "dispatches"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", name="uq_dispatch_job_destination"),
        Index("ix_dispatches_due", "state", "run_after"),
    )

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    objects: Mapped[list[str]] = mapped_column(TextList, default=list)
    sent: Mapped[list[str] | None] = mapped_column(TextList)
    """The SOP Instance UIDs the destination acknowledged (None until sent)."""
    status: Mapped[str | None] = mapped_column(Text)
    commitment: Mapped[CommitmentState | None] = mapped_column(StateText(CommitmentState))
    """None for a destination not asked to commit (`peers.NAME.commitment`)."""
    transaction_uid: Mapped[str | None] = mapped_column(UID, index=True)
    """The storage commitment request's Transaction UID (each request a new one)."""


class Notification(LeasedWork, Base):
    """Telling an HTTP endpoint (`notifications:` NAME) that a job ended as it asked:
    `event` is positive, failed or done; `payload` the JSON posted."""

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("job_id", "target", "event", name="uq_notification_job_target_event"),
        Index("ix_notifications_due", "state", "run_after"),
    )

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    target: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(16))
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str | None] = mapped_column(Text)


class Fetch(LeasedWork, Base):
    """Retrieving studies from a source (a PACS, a DICOMweb server): by `ainode fetch`, or the
    priors of a completed study (`prior_of`). `query` is the JSON of a
    `node.delivery.fetch.FetchQuery`."""

    __tablename__ = "fetches"
    __table_args__ = (Index("ix_fetches_due", "state", "run_after"),)

    source: Mapped[str] = mapped_column(String(64))
    query: Mapped[str] = mapped_column(Text)
    prior_of: Mapped[str | None] = mapped_column(UID)
    studies: Mapped[list[str]] = mapped_column(TextList, default=list)
    instances: Mapped[int] = mapped_column(Integer, default=0)


class AuditEvent(Base):
    """The audit trail: append-only (no code updates or deletes a row). `detail` is JSON."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    detail: Mapped[str] = mapped_column(Text)


class AuditExport(Base):
    """How far the audit trail has gone to an export target (the last event id sent)."""

    __tablename__ = "audit_exports"

    target: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_event_id: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Embedding(Base):
    """A foundation model's feature vector of a series (unit length, float32 bytes); the
    latest revision's replaces the earlier one."""

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("series_id", "pipeline", name="uq_embedding_series_pipeline"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    pipeline: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    dimensions: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    profile: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The feature map's layout along the body axis (float32), which the guard scores."""
    guard_distance: Mapped[float | None] = mapped_column(Float)
    """The distance to the pipeline's guard reference when it was scored (`node.work.guard`)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class GuardReference(Base):
    """A pipeline's input-guard reference (`ainode guard fit`): the fitted model as npz
    bytes, the series it was fitted on and the distance above which a series is unlike it."""

    __tablename__ = "guard_references"

    pipeline: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    series: Mapped[list[str]] = mapped_column(TextList)
    fitted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    model: Mapped[bytes] = mapped_column(LargeBinary)


class WorkitemState(enum.StrEnum):
    """A Unified Procedure Step's Procedure Step State (PS3.4 CC.1.1)."""

    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN PROGRESS"
    CANCELED = "CANCELED"
    COMPLETED = "COMPLETED"


class Workitem(Base):
    """A UPS-RS workitem (IHE AIW-I): an AI task asked of the node, or announced by it.
    `dataset` is its DICOM JSON as it stands; the columns are what the node acts on."""

    __tablename__ = "workitems"
    __table_args__ = (Index("ix_workitems_state", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[WorkitemState] = mapped_column(StateText(WorkitemState))
    transaction_uid: Mapped[str | None] = mapped_column(UID)
    """The lock of whoever claimed it (IN PROGRESS); never shown to anyone else."""
    performer: Mapped[str | None] = mapped_column(String(64))
    """Who claimed it: this node's AE title, or the caller that did."""
    pipeline: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(UID)
    series_instance_uids: Mapped[list[str]] = mapped_column(TextList, default=list)
    """The input series it names (none: the study's CT series)."""
    destinations: Mapped[list[str]] = mapped_column(TextList, default=list)
    jobs: Mapped[list[str]] = mapped_column(TextList, default=list)
    """The ids of the jobs that perform it."""
    fetch_id: Mapped[int | None] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[str | None] = mapped_column(String(64))
    """The last progress reported (percent and description), so each is reported once."""
    dataset: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WorkitemEvent(Base):
    """An event report of a workitem (PS3.4 CC.2.4), kept in order for the subscribers'
    channels; `for_ae` names the one subscriber an initial state report is for."""

    __tablename__ = "workitem_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workitem_uid: Mapped[str] = mapped_column(UID, index=True)
    event_type: Mapped[int] = mapped_column(Integer)
    report: Mapped[str] = mapped_column(Text)
    """The event report as DICOM JSON."""
    for_ae: Mapped[str | None] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class WorkitemSubscription(Base):
    """An AE's subscription to one workitem, or to the worklist (`workitem_uid` None);
    `delivered` is the last event its channel sent (events after it wait for it)."""

    __tablename__ = "workitem_subscriptions"
    __table_args__ = (
        UniqueConstraint("ae_title", "workitem_uid", name="uq_workitem_subscription"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), index=True)
    workitem_uid: Mapped[str | None] = mapped_column(UID)
    deletion_lock: Mapped[bool] = mapped_column(Boolean, default=False)
    since_event: Mapped[int] = mapped_column(Integer, default=0)
    """Events after this one are the subscription's (earlier ones predate it)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WorkitemChannel(Base):
    """How far an AE's event channel (WebSocket) has read: reconnecting, it gets the rest."""

    __tablename__ = "workitem_channels"

    ae_title: Mapped[str] = mapped_column(String(16), primary_key=True)
    delivered: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Leadership(Base):
    """Who holds a duty that exactly one process may do at a time (the coordinator's), and
    until when: a holder renews it, a stand-by takes it once it has expired."""

    __tablename__ = "leadership"

    duty: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RemoteWorker(Base):
    """A worker on another host as it last made itself known (`ainode worker --node`): what
    it runs and on what device."""

    __tablename__ = "remote_workers"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    """`<credential>/<worker>`, the owner of the leases it takes."""
    pipelines: Mapped[list[str]] = mapped_column(TextList)
    device: Mapped[str] = mapped_column(String(200))
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
