"""QIDO-RS and WADO-RS on the node, asked with dicomweb-client, answered as Orthanc answers
for the same real instances."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.uid import ExplicitVRLittleEndian

from tests.node.web.conftest import WebNode
from tests.node.web.test_stow import real_files
from tests.peers import OrthancServer

STUDY_KEYS = ["StudyInstanceUID", "StudyDate", "PatientID", "AccessionNumber"]
SERIES_KEYS = ["SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"]
METADATA_KEYS = [
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "RescaleSlope",
    "RescaleIntercept",
    "SliceThickness",
    "BitsAllocated",
    "PixelRepresentation",
]


def values(dataset: dict, keys: list[str]) -> dict[str, object]:
    ds = pydicom.Dataset.from_json(dataset)
    return {key: ds.get(key) for key in keys}


@pytest.fixture
def both(
    web_node: WebNode, orthanc: OrthancServer
) -> tuple[DICOMwebClient, DICOMwebClient, list[Path]]:
    files = real_files(6)
    node = DICOMwebClient(web_node.dicomweb, headers={**web_node.auth("modality-web")})
    node.store_instances([pydicom.dcmread(f) for f in files])
    pacs = DICOMwebClient(orthanc.dicomweb_url)
    pacs.store_instances([pydicom.dcmread(f) for f in files])
    reader = DICOMwebClient(web_node.dicomweb, headers=web_node.auth("viewer"))
    return reader, pacs, files


def test_qido_answers_as_orthanc(both, web_node: WebNode) -> None:
    node, pacs, files = both
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    (ours,) = node.search_for_studies(search_filters={"PatientID": first.PatientID})
    (theirs,) = pacs.search_for_studies(search_filters={"PatientID": first.PatientID})
    assert values(ours, STUDY_KEYS) == values(theirs, STUDY_KEYS)
    assert pydicom.Dataset.from_json(ours).NumberOfStudyRelatedInstances == len(files)
    assert pydicom.Dataset.from_json(ours).ModalitiesInStudy == "CT"

    study = first.StudyInstanceUID
    (series_ours,) = node.search_for_series(study)
    (series_theirs,) = pacs.search_for_series(study)
    assert values(series_ours, SERIES_KEYS) == values(series_theirs, SERIES_KEYS)
    ours_instances = node.search_for_instances(study, first.SeriesInstanceUID)
    theirs_instances = pacs.search_for_instances(study, first.SeriesInstanceUID)
    uids = [pydicom.Dataset.from_json(i).SOPInstanceUID for i in ours_instances]
    assert sorted(uids) == sorted(
        pydicom.Dataset.from_json(i).SOPInstanceUID for i in theirs_instances
    )

    assert node.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    date = first.StudyDate
    assert len(node.search_for_studies(search_filters={"StudyDate": f"{date}-"})) == 1
    assert node.search_for_studies(search_filters={"StudyDate": f"-{int(date) - 1}"}) == []
    assert len(node.search_for_studies(search_filters={"ModalitiesInStudy": "CT"})) == 1
    assert node.search_for_studies(search_filters={"ModalitiesInStudy": "MR"}) == []
    assert len(node.search_for_series(search_filters={"ModalitiesInStudy": "CT"})) == 1
    assert node.search_for_series(search_filters={"ModalitiesInStudy": "MR"}) == []
    prefix = str(first.PatientID)[:2] + "*"
    assert len(node.search_for_studies(search_filters={"PatientID": prefix})) == 1
    assert len(node.search_for_instances(study, limit=2, offset=1)) == 2


def test_wado_metadata_frames_and_instances_match_the_files(both) -> None:
    node, pacs, files = both
    first = pydicom.dcmread(files[0])
    study, series, sop = first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID

    ours = node.retrieve_instance_metadata(study, series, sop)
    theirs = pacs.retrieve_instance_metadata(study, series, sop)
    assert values(ours, METADATA_KEYS) == values(theirs, METADATA_KEYS)
    assert ours["7FE00010"]["BulkDataURI"].endswith(f"/instances/{sop}/bulkdata/7fe00010")
    assert len(node.retrieve_series_metadata(study, series)) == len(files)

    (frame,) = node.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
    pixels = np.frombuffer(frame, dtype=first.pixel_array.dtype).reshape(first.pixel_array.shape)
    assert np.array_equal(pixels, first.pixel_array)

    as_stored = node.retrieve_instance(
        study, series, sop, media_types=(("application/dicom", "*"),)
    )
    assert as_stored.file_meta.TransferSyntaxUID == first.file_meta.TransferSyntaxUID
    default = node.retrieve_instance(study, series, sop, media_types=("application/dicom",))
    assert default.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # PS3.18 8.7.3.5.2
    assert np.array_equal(default.pixel_array, first.pixel_array)
    assert len(node.retrieve_series(study, series)) == len(files)


def test_reading_needs_the_reader_role(web_node: WebNode, both) -> None:
    url = f"{web_node.dicomweb}/studies"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url, headers=web_node.auth("modality-web")).status_code == 403
    assert httpx.get(url, headers=web_node.auth("it-admin")).status_code == 200
    unknown = httpx.get(f"{url}/1.2.3.4/series/5.6/metadata", headers=web_node.auth("viewer"))
    assert unknown.status_code == 404
