"""Where studies are fetched from: a DICOMweb server (QIDO-RS, then WADO-RS) or a DIMSE peer
(C-FIND, then C-MOVE to the node's own AE title or C-GET)."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from typing import Protocol

import requests
from pydicom import Dataset, dcmwrite
from pydicom.uid import UID

from node.config import DicomWebDestination, Peer
from node.delivery.fetch.query import FetchQuery, StudyHit
from node.delivery.webclient import dicomweb_client
from node.edge.retrieve import RetrieveFailed, find_studies, get_study, move_study
from node.ingest.part10 import read_part10
from node.store.db.models import Source

InstanceSink = Callable[[bytes, UID], bool]
"""Stores one retrieved instance (its dataset as encoded, its transfer syntax); True if kept."""
Progress = Callable[[int], None]
"""Told how many instances of the current study have arrived."""


class StudySource(Protocol):
    name: str
    transport: Source

    def find(self, query: FetchQuery) -> list[StudyHit]: ...

    def retrieve(self, study_uid: str, sink: InstanceSink, progress: Progress) -> int:
        """Retrieve one study; the number of instances it delivered."""
        ...


class DicomWebSource:
    transport = Source.DICOMWEB

    def __init__(self, name: str, server: DicomWebDestination, timeout: float) -> None:
        self.name = name
        self._client = dicomweb_client(server, timeout)
        self._url = server.url

    def find(self, query: FetchQuery) -> list[StudyHit]:
        filters: dict[str, str] = {}
        if query.study:
            filters["StudyInstanceUID"] = query.study
        if query.accession:
            filters["AccessionNumber"] = query.accession
        if query.patient_id:
            filters["PatientID"] = query.patient_id
        if query.modality:
            filters["ModalitiesInStudy"] = query.modality
        try:
            found = self._client.search_for_studies(
                search_filters=filters, fields=["StudyDate", "ModalitiesInStudy"]
            )
        except requests.RequestException as exc:
            raise RetrieveFailed(f"QIDO-RS at {self._url} failed: {exc}") from exc
        return [_hit(Dataset.from_json(item)) for item in found]

    def retrieve(self, study_uid: str, sink: InstanceSink, progress: Progress) -> int:
        delivered = 0
        try:
            for instance in self._client.iter_study(study_uid):
                buffer = BytesIO()
                dcmwrite(buffer, instance, enforce_file_format=True)
                data = buffer.getvalue()
                header = read_part10(data)
                if not sink(data[header.dataset_offset :], header.transfer_syntax):
                    raise RetrieveFailed(f"instance {instance.SOPInstanceUID} was not stored")
                delivered += 1
                progress(delivered)
        except requests.RequestException as exc:
            raise RetrieveFailed(f"WADO-RS from {self._url} failed: {exc}") from exc
        return delivered


class DimseSource:
    transport = Source.DIMSE

    def __init__(self, name: str, peer: Peer, local_ae: str, timeout: float) -> None:
        self.name = name
        self._peer = peer
        self._local_ae = local_ae
        self._timeout = timeout

    def find(self, query: FetchQuery) -> list[StudyHit]:
        identifier = Dataset()
        identifier.StudyInstanceUID = query.study or ""
        identifier.AccessionNumber = query.accession or ""
        identifier.PatientID = query.patient_id or ""
        identifier.ModalitiesInStudy = query.modality or ""
        since = query.since.strftime("%Y%m%d") if query.since else ""
        identifier.StudyDate = f"{since}-" if since else ""
        found = find_studies(self._local_ae, self._peer, identifier, self._timeout)
        return [_hit(match) for match in found if match.get("StudyInstanceUID")]

    def retrieve(self, study_uid: str, sink: InstanceSink, progress: Progress) -> int:
        if self._peer.retrieve == "get":
            result = get_study(self._local_ae, self._peer, study_uid, self._timeout, sink, progress)
        else:
            result = move_study(self._local_ae, self._peer, study_uid, self._timeout, progress)
        return result.completed + result.warning


def _hit(found: Dataset) -> StudyHit:
    modalities = found.get("ModalitiesInStudy") or []
    if isinstance(modalities, str):
        modalities = [modalities]
    return StudyHit(
        str(found.StudyInstanceUID),
        str(found.get("StudyDate") or "") or None,
        tuple(str(m) for m in modalities),
    )
