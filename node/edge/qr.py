"""The Query/Retrieve SCP (PS3.4 C): C-FIND, C-MOVE and C-GET at Patient Root and Study
Root over what the node holds, answered through the association's `Exchange`.

C-FIND answers a pending response per match with the keys the request asked for; C-MOVE
sends the matching instances to a configured peer on an association of its own, C-GET on the
requester's association; both report their sub-operations after each one. A C-CANCEL stops
any of them at the next response. Only peers whose entry allows it (`peers.NAME.allow`) may
query or retrieve.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Protocol

from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, _config
from pynetdicom.dsutils import decode, encode

from node.config import Peer, Service, Settings
from node.edge.messages import QueryRequest
from node.edge.protocol import CommandField
from node.edge.scu import STORED, associate
from node.edge.status import RetrieveStatus, Status
from node.edge.transcode import transcoded

log = logging.getLogger(__name__)

_config.STORE_SEND_CHUNKED_DATASET = True
"""pynetdicom sends a file given by its path from the file's bytes after the meta header
(else it reads, decodes and encodes it again): C-MOVE sends the bytes as stored."""

PATIENT_ROOT = {
    CommandField.C_FIND_RQ: UID("1.2.840.10008.5.1.4.1.2.1.1"),
    CommandField.C_MOVE_RQ: UID("1.2.840.10008.5.1.4.1.2.1.2"),
    CommandField.C_GET_RQ: UID("1.2.840.10008.5.1.4.1.2.1.3"),
}
STUDY_ROOT = {
    CommandField.C_FIND_RQ: UID("1.2.840.10008.5.1.4.1.2.2.1"),
    CommandField.C_MOVE_RQ: UID("1.2.840.10008.5.1.4.1.2.2.2"),
    CommandField.C_GET_RQ: UID("1.2.840.10008.5.1.4.1.2.2.3"),
}
QUERY_RETRIEVE_CLASSES = (*PATIENT_ROOT.values(), *STUDY_ROOT.values())
QUERY_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
"""What an identifier may be encoded in."""
SERVICES = {
    CommandField.C_FIND_RQ: Service.FIND,
    CommandField.C_MOVE_RQ: Service.MOVE,
    CommandField.C_GET_RQ: Service.GET,
}
LEVELS = {
    "PATIENT": "patient",
    "STUDY": "study",
    "SERIES": "series",
    "IMAGE": "instance",
}
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
               "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}  # fmt: skip
ORDER = ("PATIENT", "STUDY", "SERIES", "IMAGE")
TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})


class Sendable(Protocol):
    """An instance as stored (`node.store.query.StoredFile`)."""

    @property
    def path(self) -> Path: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def transfer_syntax_uid(self) -> str: ...
    @property
    def study_instance_uid(self) -> str: ...


class Archive(Protocol):
    """What the node holds, queried by level (`patient`, `study`, `series`, `instance`) and
    an identifier's matching keys; ValueError for a key value it cannot match."""

    def matches(self, level: str, keys: list[tuple[str, str]]) -> Iterator[tuple[Dataset, bool]]:
        """Each match with every attribute the level answers, and whether a matching key
        was not supported."""

    def files(self, level: str, keys: list[tuple[str, str]]) -> Sequence[Sendable]: ...

    def served(self, report: Served) -> None:
        """Keep a record of a query or retrieve answered (the audit trail)."""


@dataclass(frozen=True)
class Served:
    """What a query or retrieve gave a peer: matches, or instances sent where."""

    calling_ae: str
    service: str
    """C-FIND, C-MOVE or C-GET."""
    level: str
    matches: int = 0
    destination: str | None = None
    completed: int = 0
    failed: int = 0
    studies: tuple[str, ...] = ()


@dataclass
class SubOperations:
    """The counts a C-MOVE or C-GET response reports."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0


class Exchange(Protocol):
    """One request's side of the association: its responses, its C-CANCEL, and for C-GET
    the C-STORE sub-operations on the same association."""

    def respond(
        self,
        status: int,
        identifier: Dataset | None = None,
        counts: SubOperations | None = None,
        comment: str | None = None,
    ) -> None: ...

    def cancelled(self) -> bool: ...

    def store(self, file: Sendable) -> int | str:
        """The C-STORE response status of a sub-operation, or why it was not sent."""


class Refused(Exception):
    """The request is answered with `status` and `comment`, and nothing is done."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


class QueryRetrieveSCP:
    """C-FIND, C-MOVE and C-GET over an `Archive`, for the peers allowed to use them."""

    def __init__(self, settings: Settings, archive: Archive) -> None:
        self._settings = settings
        self._archive = archive

    def serve(self, calling_ae: str, request: QueryRequest, exchange: Exchange) -> None:
        """Answer `request` (its responses go through `exchange`)."""
        try:
            self._allowed(calling_ae, request)
            level, keys, identifier = _identifier(request)
            if request.command == CommandField.C_FIND_RQ:
                self._find(calling_ae, request, level, keys, identifier, exchange)
            else:
                self._retrieve(calling_ae, request, level, keys, exchange)
        except Refused as refused:
            log.warning("%s from %s refused: %s", request.command.name, calling_ae, refused)
            exchange.respond(refused.status, comment=str(refused))

    def _allowed(self, calling_ae: str, request: QueryRequest) -> None:
        service = SERVICES[request.command]
        peer = self._settings.peer_by_ae_title(calling_ae)
        if peer is None or service not in peer.allow:
            raise Refused(
                RetrieveStatus.NOT_AUTHORIZED, f"{calling_ae} may not {service.value} here"
            )

    def _find(
        self,
        calling_ae: str,
        request: QueryRequest,
        level: str,
        keys: list[tuple[str, str]],
        identifier: Dataset,
        exchange: Exchange,
    ) -> None:
        count = 0
        top = "PATIENT" if request.sop_class_uid in PATIENT_ROOT.values() else "STUDY"
        try:
            for match, unsupported in self._archive.matches(LEVELS[level], keys):
                if exchange.cancelled():
                    break
                status = RetrieveStatus.PENDING_WARNING if unsupported else RetrieveStatus.PENDING
                exchange.respond(status, self._answer(identifier, match, level, top))
                count += 1
        except ValueError as exc:
            raise Refused(RetrieveStatus.UNABLE_TO_PROCESS, str(exc)) from exc
        canceled = exchange.cancelled()
        exchange.respond(RetrieveStatus.CANCELED if canceled else Status.SUCCESS)
        log.info(
            "C-FIND from %s at %s: %d matches%s", calling_ae, level, count,
            " (canceled)" if canceled else "",
        )  # fmt: skip
        self._archive.served(Served(calling_ae, "C-FIND", level, matches=count))

    def _answer(self, identifier: Dataset, match: Dataset, level: str, top: str) -> Dataset:
        """The keys `identifier` asked for, with the match's values (empty where the node
        has none), the unique keys of the level and those above it up to the model's `top`,
        and where to retrieve."""
        answer = Dataset()
        for element in identifier:
            if element.tag.is_private or element.keyword in ("SpecificCharacterSet", ""):
                continue
            if element.keyword in match:
                answer[element.tag] = match[element.tag]
            else:
                answer.add(DataElement(element.tag, element.VR, [] if element.VR == "SQ" else None))
        for above in ORDER[ORDER.index(top) : ORDER.index(level) + 1]:
            unique = UNIQUE_KEYS[above]
            if unique in match and unique not in answer:
                answer[unique] = match[unique]
        answer.QueryRetrieveLevel = level
        answer.RetrieveAETitle = self._settings.node.ae_title
        if any(_non_ascii(element) for element in answer):
            answer.SpecificCharacterSet = "ISO_IR 192"
        return answer

    def _retrieve(
        self,
        calling_ae: str,
        request: QueryRequest,
        level: str,
        keys: list[tuple[str, str]],
        exchange: Exchange,
    ) -> None:
        destination = None
        if request.command == CommandField.C_MOVE_RQ:
            destination = self._settings.peer_by_ae_title(request.move_destination)
            if destination is None:
                raise Refused(
                    RetrieveStatus.MOVE_DESTINATION_UNKNOWN,
                    f"move destination {request.move_destination!r} is no configured peer",
                )
        unique = UNIQUE_KEYS[level]
        if not any(keyword == unique and value for keyword, value in keys):
            raise Refused(
                RetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                f"a retrieve at {level} level names its {unique}",
            )
        try:
            files = self._archive.files(LEVELS[level], keys)
        except ValueError as exc:
            raise Refused(RetrieveStatus.UNABLE_TO_PROCESS, str(exc)) from exc
        counts = SubOperations(remaining=len(files))
        failed: list[str] = []
        if destination is None:
            sent = self._send_here(files, counts, failed, exchange)
        else:
            sent = self._send_to(destination, calling_ae, request, files, counts, failed, exchange)
        what = request.command.name.removesuffix("_RQ").replace("_", "-")
        log.info(
            "%s from %s at %s%s: %d of %d sent, %d failed%s",
            what,
            calling_ae,
            level,
            f" to {request.move_destination}" if destination is not None else "",
            counts.completed + counts.warning,
            len(files),
            counts.failed,
            "" if sent else " (canceled)",
        )
        self._archive.served(
            Served(
                calling_ae,
                what,
                level,
                matches=len(files),
                destination=request.move_destination if destination is not None else calling_ae,
                completed=counts.completed + counts.warning,
                failed=counts.failed,
                studies=tuple(sorted({file.study_instance_uid for file in files})),
            )
        )
        if not sent:
            exchange.respond(RetrieveStatus.CANCELED, _failed(failed), counts)
            return
        status: int
        if counts.failed and counts.failed == len(files):
            status = RetrieveStatus.CANNOT_PERFORM_SUBOPERATIONS
        elif counts.failed or counts.warning:
            status = RetrieveStatus.SUBOPERATIONS_WARNING
        else:
            status = Status.SUCCESS
        final = SubOperations(0, counts.completed, counts.failed, counts.warning)
        exchange.respond(status, _failed(failed), final)

    def _send_here(
        self,
        files: Sequence[Sendable],
        counts: SubOperations,
        failed: list[str],
        exchange: Exchange,
    ) -> bool:
        """C-GET: each file over the requester's association; False when canceled."""
        for file in files:
            if exchange.cancelled():
                return False
            _count(counts, failed, file, exchange.store(file))
            if counts.remaining:
                exchange.respond(RetrieveStatus.PENDING, counts=counts)
        return True

    def _send_to(
        self,
        peer: Peer,
        calling_ae: str,
        request: QueryRequest,
        files: Sequence[Sendable],
        counts: SubOperations,
        failed: list[str],
        exchange: Exchange,
    ) -> bool:
        """C-MOVE: each file over a new association with `peer`; False when canceled."""
        if not files:
            return True
        ae = AE(ae_title=self._settings.node.ae_title)
        timeout = self._settings.node.network_timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for sop_class, syntax in sorted(_contexts_for(files)):  # one each: the peer takes each
            ae.add_requested_context(sop_class, syntax)
        assoc = associate(ae, peer)
        if isinstance(assoc, str):  # every sub-operation fails: counted, audited, A702
            log.warning(
                "C-MOVE from %s: %d sub-operations failed: %s", calling_ae, len(files), assoc
            )
            counts.failed, counts.remaining = counts.failed + counts.remaining, 0
            failed.extend(file.sop_instance_uid for file in files)
            return True
        try:
            for index, file in enumerate(files):
                if exchange.cancelled():
                    return False
                _count(counts, failed, file, _store_over(assoc, file, calling_ae, request))
                if not assoc.is_established:
                    for unsent in files[index + 1 :]:
                        _count(counts, failed, unsent, "the association with it ended")
                if counts.remaining:
                    exchange.respond(RetrieveStatus.PENDING, counts=counts)
        finally:
            if assoc.is_established:
                assoc.release()
        return True


def _contexts_for(files: Sequence[Sendable]) -> set[tuple[str, str]]:
    """Each SOP class in each syntax it is stored in, and in both uncompressed ones."""
    contexts = set()
    for file in files:
        for syntax in (file.transfer_syntax_uid, *QUERY_SYNTAXES):
            contexts.add((file.sop_class_uid, syntax))
    return contexts


def _identifier(request: QueryRequest) -> tuple[str, list[tuple[str, str]], Dataset]:
    """The query level, the matching keys (keyword, value) and the identifier itself."""
    implicit = request.transfer_syntax == ImplicitVRLittleEndian
    try:
        identifier = decode(BytesIO(request.identifier), implicit, True)
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        keys = [
            (element.keyword, _text(element))
            for element in identifier
            if element.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet", "")
            and not element.tag.is_private
        ]
    except Exception as exc:  # whatever the peer's bytes provoke in the decoder
        raise Refused(
            RetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            f"the identifier cannot be read: {type(exc).__name__}",
        ) from exc
    patient_root = request.sop_class_uid in PATIENT_ROOT.values()
    if level not in LEVELS or (level == "PATIENT" and not patient_root):
        raise Refused(
            RetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            f"no QueryRetrieveLevel {level!r} in this information model",
        )
    return level, keys, identifier


def _text(element: DataElement) -> str:
    """A key's value as the matcher reads it: multiple values joined by backslash; a
    sequence is not matched (a non-empty one is named as not supported)."""
    if element.VR == "SQ":
        return "(sequence)" if element.value and any(len(item) for item in element.value) else ""
    value = element.value
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _non_ascii(element: DataElement) -> bool:
    return element.VR in TEXT_VRS and element.value is not None and not str(element.value).isascii()


def _count(counts: SubOperations, failed: list[str], file: Sendable, status: int | str) -> None:
    counts.remaining -= 1
    if status == Status.SUCCESS:
        counts.completed += 1
    elif isinstance(status, int) and status in STORED:
        counts.warning += 1
    else:
        counts.failed += 1
        failed.append(file.sop_instance_uid)
        log.warning("sub-operation for %s failed: %s", file.sop_instance_uid, _status(status))


def _status(status: int | str) -> str:
    return status if isinstance(status, str) else f"status 0x{status:04X}"


def _failed(failed: list[str]) -> Dataset | None:
    """The identifier of a final response with failures: their SOP Instance UIDs."""
    if not failed:
        return None
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = failed
    return identifier


def _store_over(
    assoc: Association, file: Sendable, originator: str, request: QueryRequest
) -> int | str:
    """Send `file` over a pynetdicom association: as stored when the peer took its syntax,
    else decoded into one it took. The response status, or why nothing was sent."""
    message_id = request.message_id
    try:
        response = assoc.send_c_store(
            file.path, originator_aet=originator, originator_id=message_id
        )
    except ValueError:  # no accepted context for the stored syntax
        try:
            response = assoc.send_c_store(
                decoded(file.path), originator_aet=originator, originator_id=message_id
            )
        except (ValueError, OSError, InvalidDicomError, RuntimeError) as exc:
            return f"not sent: {exc}"
    except (OSError, InvalidDicomError) as exc:
        return f"the stored file cannot be read: {exc}"
    if "Status" not in response:
        return "no response"
    return int(response.Status)


def decoded(path: Path) -> Dataset:
    """The stored instance with its pixel data decoded (Explicit VR Little Endian), its
    UIDs kept."""
    return transcoded(dcmread(path), ExplicitVRLittleEndian)


def encoded(dataset: Dataset, syntax: UID) -> bytes:
    """`dataset` as bytes in an uncompressed `syntax`."""
    data = encode(dataset, syntax == ImplicitVRLittleEndian, True)
    if data is None:
        raise ValueError(f"cannot encode the dataset in {syntax}")
    return data
