"""Query/retrieve as a client (PS3.4 C, Study Root): C-FIND the studies a query matches,
then C-MOVE a study to the node's own AE title, or C-GET it on the same association."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, build_role, evt
from pynetdicom.dimse_primitives import C_STORE

from node.config import Peer
from node.edge.scu import associate
from node.edge.status import RetrieveStatus, Status

log = logging.getLogger(__name__)

PENDING = {RetrieveStatus.PENDING, RetrieveStatus.PENDING_WARNING}
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
GET_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
)
"""What a C-GET accepts (each with the SCP role): chest CT and the objects that go with it."""
GET_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
]


class RetrieveFailed(Exception):
    """The peer could not be reached, refused, or did not deliver everything."""


@dataclass(frozen=True)
class Retrieved:
    completed: int
    failed: int
    warning: int


Received = Callable[[bytes, UID], bool]
"""Takes one instance a C-GET delivered (the dataset as encoded, its transfer syntax);
True when it was stored."""


def find_studies(local_ae: str, peer: Peer, identifier: Dataset, timeout: float) -> list[Dataset]:
    """The studies that match `identifier` (QueryRetrieveLevel STUDY is set here)."""
    identifier.QueryRetrieveLevel = "STUDY"
    ae = _ae(local_ae, timeout)
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = _open(ae, peer)
    found: list[Dataset] = []
    try:
        for status, match in assoc.send_c_find(identifier, STUDY_ROOT_FIND):
            code = _status(status)
            if code in PENDING and match is not None:
                found.append(match)
            elif code != Status.SUCCESS:
                raise RetrieveFailed(f"C-FIND answered {_describe(status)}")
    finally:
        assoc.release()
    return found


def move_study(
    local_ae: str, peer: Peer, study_uid: str, timeout: float, progress: Callable[[int], None]
) -> Retrieved:
    """C-MOVE the study to `local_ae` (the node's own SCP receives it)."""
    ae = _ae(local_ae, timeout)
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = _open(ae, peer)
    try:
        responses = assoc.send_c_move(_study(study_uid), local_ae, STUDY_ROOT_MOVE)
        return _follow(responses, progress, "C-MOVE")
    finally:
        assoc.release()


def get_study(
    local_ae: str,
    peer: Peer,
    study_uid: str,
    timeout: float,
    received: Received,
    progress: Callable[[int], None],
) -> Retrieved:
    """C-GET the study: its instances come back on this association, each to `received`."""
    ae = _ae(local_ae, timeout)
    ae.add_requested_context(STUDY_ROOT_GET)
    for sop_class in GET_STORAGE_CLASSES:
        ae.add_requested_context(sop_class, GET_SYNTAXES)
    roles = [build_role(sop_class, scp_role=True) for sop_class in GET_STORAGE_CLASSES]

    def on_store(event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)
        dataset = request.DataSet
        encoded = dataset.getvalue() if dataset is not None else b""
        stored = received(encoded, UID(event.context.transfer_syntax))
        return Status.SUCCESS if stored else Status.OUT_OF_RESOURCES

    assoc = associate(ae, peer, roles, [(evt.EVT_C_STORE, on_store)])
    if isinstance(assoc, str):
        raise RetrieveFailed(assoc)
    try:
        responses = assoc.send_c_get(_study(study_uid), STUDY_ROOT_GET)
        return _follow(responses, progress, "C-GET")
    finally:
        assoc.release()


def _follow(
    responses: Iterator[tuple[Dataset, Dataset | None]],
    progress: Callable[[int], None],
    operation: str,
) -> Retrieved:
    final = None
    for status, _ in responses:
        code = _status(status)
        if code in PENDING:
            progress(int(status.get("NumberOfCompletedSuboperations", 0)))
            continue
        final = status
    if final is None:
        raise RetrieveFailed(f"{operation}: the association ended without a final response")
    code = _status(final)
    result = Retrieved(
        int(final.get("NumberOfCompletedSuboperations", 0)),
        int(final.get("NumberOfFailedSuboperations", 0)),
        int(final.get("NumberOfWarningSuboperations", 0)),
    )
    if code not in (Status.SUCCESS, RetrieveStatus.SUBOPERATIONS_WARNING) or result.failed:
        raise RetrieveFailed(
            f"{operation} answered {_describe(final)}: {result.completed} completed, "
            f"{result.failed} failed"
        )
    return result


def _ae(local_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=local_ae)
    ae.acse_timeout = ae.network_timeout = timeout
    ae.dimse_timeout = max(timeout, 600.0)  # a retrieve's responses come as sub-ops finish
    return ae


def _open(ae: AE, peer: Peer) -> Association:
    assoc = associate(ae, peer)
    if isinstance(assoc, str):
        raise RetrieveFailed(assoc)
    return assoc


def _study(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


def _status(status: Dataset) -> int | None:
    return int(status.Status) if "Status" in status else None


def _describe(status: Dataset) -> str:
    code = _status(status)
    if code is None:
        return "nothing (no response)"
    comment = str(status.get("ErrorComment", "")).strip()
    return f"0x{code:04X}" + (f" ({comment})" if comment else "")
