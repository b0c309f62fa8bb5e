"""The audit trail exported as DICOM audit messages (PS3.15 A.5: RFC 3881 XML) to a syslog
collector (RFC 5424 frames, MSGID `DICOM+RFC3881`, facility authpriv), as an audit
repository expects them.

The database is the queue: events go out in id order and `audit_exports` remembers the last
one sent, so a collector that is down gets everything once it is back, and the trail itself
stays append-only. Audit messages carry the patient's ID and name, as PS3.15 asks; the
node's application log never does.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from xml.etree import ElementTree

from sqlalchemy import Engine, func, select

from node.config import Settings, SyslogSettings
from node.ops.audit import (
    AdminAction,
    ApplicationEvent,
    Committed,
    Event,
    Fetched,
    JobEnded,
    Kind,
    Queried,
    Received,
    Retrieved,
    Sent,
    WorkitemChanged,
    list_events_after,
)
from node.store.db.models import AuditExport, Instance, Series, Study, utcnow
from node.store.db.upsert import insert_into

log = logging.getLogger(__name__)

BATCH = 200
FACILITY_AUTHPRIV = 10
SEVERITY = {0: 5, 4: 4, 8: 3, 12: 3}
"""Event outcome -> syslog severity: success is a notice, failures warnings or errors."""
BOM = "\ufeff"


@dataclass(frozen=True)
class Coded:
    code: str
    scheme: str
    meaning: str


TRANSFERRED = Coded("110104", "DCM", "DICOM Instances Transferred")
ACCESSED = Coded("110103", "DCM", "DICOM Instances Accessed")
SECURITY_ALERT = Coded("110113", "DCM", "Security Alert")
APPLICATION_ACTIVITY = Coded("110100", "DCM", "Application Activity")
PATIENT_RECORD = Coded("110110", "DCM", "Patient Record")
QUERY = Coded("110112", "DCM", "Query")
PROCEDURE_RECORD = Coded("110111", "DCM", "Procedure Record")
SOFTWARE_CONFIGURATION = Coded("110131", "DCM", "Software Configuration")
RESTRICTED_FUNCTION = Coded("110132", "DCM", "Use of Restricted Function")
APPLICATION_START = Coded("110120", "DCM", "Application Start")
APPLICATION_STOP = Coded("110121", "DCM", "Application Stop")
SOURCE = Coded("110153", "DCM", "Source Role ID")
DESTINATION = Coded("110152", "DCM", "Destination Role ID")
APPLICATION = Coded("110150", "DCM", "Application")
APPLICATION_LAUNCHER = Coded("110151", "DCM", "Application Launcher")
STUDY_UID = Coded("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER = Coded("2", "RFC-3881", "Patient Number")
URI = Coded("12", "RFC-3881", "URI")


@dataclass(frozen=True)
class StudyFacts:
    """What a message says of a study: its patient and the SOP classes involved."""

    uid: str
    patient_id: str | None
    patient_name: str | None
    sop_classes: dict[str, int]


def audit_message(event: Event, node_ae: str, studies: Iterable[StudyFacts]) -> bytes:
    """The event as a PS3.15 A.5.1 AuditMessage (UTF-8 XML)."""
    root = ElementTree.Element("AuditMessage")
    facts = event.facts
    action, event_id, outcome = _event(event)
    identification = _add(
        root,
        "EventIdentification",
        EventActionCode=action,
        EventDateTime=event.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        EventOutcomeIndicator=str(outcome),
    )
    _code(identification, "EventID", event_id)
    type_code = _event_type(event)
    if type_code is not None:
        _code(identification, "EventTypeCode", type_code)
    for user, requestor, role, address in _participants(event, node_ae):
        participant = _add(
            root, "ActiveParticipant", UserID=user, UserIsRequestor=str(requestor).lower()
        )
        if address:
            participant.set("NetworkAccessPointID", address)
            participant.set("NetworkAccessPointTypeCode", "2")
        if role is not None:
            _code(participant, "RoleIDCode", role)
    source = _add(root, "AuditSourceIdentification", AuditSourceID=node_ae)
    _code(source, "AuditSourceTypeCode", Coded("4", "RFC-3881", "Application Server"))
    for study in studies:
        _study_objects(root, study)
    if isinstance(facts, AdminAction | ApplicationEvent):
        subject = _add(
            root,
            "ParticipantObjectIdentification",
            ParticipantObjectID=f"ainode:{facts.action}",
            ParticipantObjectTypeCode="2",
            ParticipantObjectTypeCodeRole="13",
        )
        _code(subject, "ParticipantObjectIDTypeCode", URI)
        shown = facts.model_dump(mode="json", exclude={"before", "after"}, exclude_defaults=True)
        description = ", ".join(f"{key}={value}" for key, value in shown.items())
        _add(
            subject,
            "ParticipantObjectDetail",
            type="Alert Description",
            value=base64.b64encode(description.encode()).decode(),
        )
    return bytes(ElementTree.tostring(root, encoding="utf-8", xml_declaration=False))


def syslog_frame(message: bytes, outcome: int, hostname: str, at: datetime) -> bytes:
    """An RFC 5424 syslog message: `<PRI>1 TIMESTAMP HOST ainode - DICOM+RFC3881 - BOM XML`."""
    priority = FACILITY_AUTHPRIV * 8 + SEVERITY.get(outcome, 3)
    stamp = at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = f"<{priority}>1 {stamp} {hostname[:255] or '-'} ainode - DICOM+RFC3881 - "
    return header.encode() + BOM.encode() + message


class SyslogSender:
    """One connection to the collector (TCP and TLS frames carry their length, RFC 6587)."""

    def __init__(self, settings: SyslogSettings) -> None:
        self._settings = settings
        self._socket: socket.socket | None = None

    def send(self, frame: bytes) -> None:
        settings = self._settings
        if settings.protocol == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.sendto(frame, (settings.host, settings.port))
            return
        if self._socket is None:
            self._socket = self._connect()
        try:
            self._socket.sendall(f"{len(frame)} ".encode() + frame)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _connect(self) -> socket.socket:
        settings = self._settings
        plain = socket.create_connection((settings.host, settings.port), timeout=10)
        if settings.protocol != "tls":
            return plain
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None
        )
        return context.wrap_socket(plain, server_hostname=settings.host)


class AuditExporter:
    """Sends the events not sent yet, in order; stops at the first failure and resumes there."""

    TARGET = "syslog"

    def __init__(self, engine: Engine, settings: Settings) -> None:
        assert settings.audit.syslog is not None
        self._engine = engine
        self._node_ae = settings.node.ae_title
        self._sender = SyslogSender(settings.audit.syslog)
        self._hostname = socket.gethostname()
        self._failing = False
        self._upsert = insert_into(engine, AuditExport)

    def run_due(self) -> int:
        """Export what is waiting; how many events went out. The position is saved once
        per batch, and where a send fails."""
        sent, last = 0, self._last_sent()
        while events := list_events_after(self._engine, last, BATCH):
            stopped = self._send(events)
            delivered = events if stopped is None else events[:stopped]
            if delivered:
                last = delivered[-1].id
                self._mark(last)
                sent += len(delivered)
            if stopped is not None:
                return sent
        if self._failing:
            log.info("audit export to syslog resumed")
            self._failing = False
        return sent

    def _send(self, events: list[Event]) -> int | None:
        """Send in order; the index of the first event that could not go, else None."""
        for index, event in enumerate(events):
            message = audit_message(event, self._node_ae, self._studies(event))
            frame = syslog_frame(message, _event(event)[2], self._hostname, event.at)
            try:
                self._sender.send(frame)
            except OSError as exc:
                if not self._failing:
                    log.warning("audit export to syslog paused: %s (retrying)", exc)
                self._failing = True
                return index
        return None

    def close(self) -> None:
        self._sender.close()

    def _last_sent(self) -> int:
        with self._engine.connect() as conn:
            last = conn.execute(
                select(AuditExport.last_event_id).where(AuditExport.target == self.TARGET)
            ).scalar_one_or_none()
        return last or 0

    def _mark(self, event_id: int) -> None:
        values = {"target": self.TARGET, "last_event_id": event_id, "updated_at": utcnow()}
        statement = self._upsert.values(**values).on_conflict_do_update(
            index_elements=["target"],
            set_={"last_event_id": event_id, "updated_at": values["updated_at"]},
        )
        with self._engine.begin() as conn:
            conn.execute(statement)

    def _studies(self, event: Event) -> list[StudyFacts]:
        facts = event.facts
        listed = facts.studies if isinstance(facts, Received | Fetched | Retrieved) else []
        uids = listed or ([event.study_instance_uid] if event.study_instance_uid else [])
        if not uids:
            return []
        with self._engine.connect() as conn:
            patients = {
                row.study_instance_uid: row
                for row in conn.execute(
                    select(Study.study_instance_uid, Study.patient_id, Study.patient_name).where(
                        Study.study_instance_uid.in_(uids)
                    )
                )
            }
            classes = (
                select(Study.study_instance_uid, Instance.sop_class_uid, func.count())
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
            )
            if isinstance(facts, Sent | Committed) and facts.sop_instances:
                classes = classes.where(Instance.sop_instance_uid.in_(facts.sop_instances))
            elif isinstance(facts, Received | JobEnded) and facts.series:
                classes = classes.where(Series.series_instance_uid.in_(facts.series))
            else:
                classes = classes.where(Study.study_instance_uid.in_(uids))
            counts: dict[str, dict[str, int]] = {}
            for study_uid, sop_class, count in conn.execute(
                classes.group_by(Study.study_instance_uid, Instance.sop_class_uid)
            ):
                counts.setdefault(study_uid, {})[sop_class] = count
        return [
            StudyFacts(
                uid,
                patients[uid].patient_id if uid in patients else None,
                patients[uid].patient_name if uid in patients else None,
                counts.get(uid, {}),
            )
            for uid in uids
        ]


def _event(event: Event) -> tuple[str, Coded, int]:
    """EventActionCode, EventID and EventOutcomeIndicator (0 success, 4 minor failure)."""
    facts = event.facts
    if event.kind in (Kind.RECEIVED, Kind.FETCHED):
        return "C", TRANSFERRED, 0
    if event.kind == Kind.SENT:
        return "R", TRANSFERRED, 0
    if event.kind == Kind.RETRIEVE:
        return "R", TRANSFERRED, 4 if isinstance(facts, Retrieved) and facts.failed else 0
    if event.kind == Kind.COMMITMENT:  # the destination's word on a transfer: kept or not
        return "R", TRANSFERRED, 4 if isinstance(facts, Committed) and facts.failed else 0
    if event.kind == Kind.QUERY:
        return "E", QUERY, 0
    if event.kind == Kind.WORKITEM:  # a new task is created, every later change an update
        created = isinstance(facts, WorkitemChanged) and facts.action == "created"
        return "C" if created else "U", PROCEDURE_RECORD, 0
    if event.kind == Kind.JOB:
        failed = isinstance(facts, JobEnded) and facts.state != "succeeded"
        return "R", ACCESSED, 4 if failed else 0
    if event.kind == Kind.APPLICATION:
        return "E", APPLICATION_ACTIVITY, 0
    if event.kind == Kind.PATIENT_RECORD:
        return "R", PATIENT_RECORD, 0
    return "E", SECURITY_ALERT, 0


def _event_type(event: Event) -> Coded | None:
    facts = event.facts
    if isinstance(facts, ApplicationEvent):
        return APPLICATION_START if facts.action == "start" else APPLICATION_STOP
    if event.kind == Kind.ADMIN:
        configuring = isinstance(facts, AdminAction) and facts.action.changes_configuration
        return SOFTWARE_CONFIGURATION if configuring else RESTRICTED_FUNCTION
    return None


def _participants(event: Event, node_ae: str) -> list[tuple[str, bool, Coded | None, str | None]]:
    """(UserID, UserIsRequestor, role, network address) of each active participant (a third
    party that asked for a transfer has no role)."""
    facts = event.facts
    if isinstance(facts, Received):
        return [
            (event.actor, True, SOURCE, _host(facts.address)),
            (node_ae, False, DESTINATION, None),
        ]
    if isinstance(facts, Fetched):
        return [
            (facts.source, False, SOURCE, None),
            (node_ae, True, DESTINATION, None),
        ]
    if isinstance(facts, Sent | Committed):
        return [
            (node_ae, True, SOURCE, None),
            (facts.destination, False, DESTINATION, None),
        ]
    if isinstance(facts, Retrieved):
        return [
            (node_ae, False, SOURCE, None),
            (facts.destination, facts.destination == event.actor, DESTINATION, None),
            *([(event.actor, True, None, None)] if facts.destination != event.actor else []),
        ]
    if isinstance(facts, Queried):
        return [(event.actor, True, SOURCE, None), (node_ae, False, DESTINATION, None)]
    if event.kind == Kind.APPLICATION:
        return [
            (node_ae, False, APPLICATION, None),
            (event.actor, True, APPLICATION_LAUNCHER, None),
        ]
    if event.kind == Kind.JOB:
        return [(event.actor, True, APPLICATION, None)]
    return [(event.actor, True, APPLICATION_LAUNCHER, None)]


def _host(address: str | None) -> str | None:
    """The IP address of `host`, `host:port` or `[v6]:port`: the NetworkAccessPointID."""
    if not address:
        return None
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address.rpartition(":")[0].strip("[]") or None


def _study_objects(root: ElementTree.Element, study: StudyFacts) -> None:
    """The study (with its SOP classes: children of the object, as the current PS3.15 A.5.1
    schema has them) and, when known, its patient."""
    obj = _add(
        root,
        "ParticipantObjectIdentification",
        ParticipantObjectID=study.uid,
        ParticipantObjectTypeCode="2",
        ParticipantObjectTypeCodeRole="3",
    )
    _code(obj, "ParticipantObjectIDTypeCode", STUDY_UID)
    for sop_class, count in sorted(study.sop_classes.items()):
        _add(obj, "SOPClass", UID=sop_class, NumberOfInstances=str(count))
    if study.patient_id is None:
        return
    patient = _add(
        root,
        "ParticipantObjectIdentification",
        ParticipantObjectID=study.patient_id,
        ParticipantObjectTypeCode="1",
        ParticipantObjectTypeCodeRole="1",
    )
    _code(patient, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    if study.patient_name:
        _add(patient, "ParticipantObjectName").text = study.patient_name


def _add(parent: ElementTree.Element, tag: str, **attributes: Any) -> ElementTree.Element:
    return ElementTree.SubElement(parent, tag, attributes)


def _code(parent: ElementTree.Element, tag: str, coded: Coded) -> None:
    _add(
        parent,
        tag,
        **{"csd-code": coded.code, "codeSystemName": coded.scheme, "originalText": coded.meaning},
    )
