"""QIDO-RS and WADO-RS on the node, asked with dicomweb-client, answered as Orthanc answers
for the same real instances."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from tests.node.edge.test_scp import ct_dataset
from tests.node.web.conftest import WebNode
from tests.node.web.test_stow import CONTENT_TYPE, body, part10, real_files
from tests.peers import OrthancServer

PIXEL_DATA = 0x7FE00010
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


def without_pixels(dataset: pydicom.Dataset) -> dict[int, object]:
    return {int(e.tag): e.value for e in dataset if e.tag != PIXEL_DATA}


def test_transcoded_retrieval_keeps_every_stored_uid_and_attribute(both) -> None:
    """Served data is the stored data: JPEG Lossless instances retrieved in the default syntax
    keep their UIDs and every attribute, twice, by study, series and instance, and their
    metadata agrees."""
    node, _, files = both
    stored = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f) for f in files)}
    first = next(iter(stored.values()))
    assert first.file_meta.TransferSyntaxUID.is_compressed
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID
    native = {"media_types": ("application/dicom",)}  # the default syntax, PS3.18 8.7.3.5.2
    for _ in range(2):
        for retrieved in (
            node.retrieve_study(study, **native),
            node.retrieve_series(study, series, **native),
            [node.retrieve_instance(study, series, uid, **native) for uid in stored],
        ):
            assert sorted(ds.SOPInstanceUID for ds in retrieved) == sorted(stored)
            for ds in retrieved:
                original = stored[ds.SOPInstanceUID]
                assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
                assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
                assert without_pixels(ds) == without_pixels(original)
                assert np.array_equal(ds.pixel_array, original.pixel_array)
    metadata = {
        (ds := pydicom.Dataset.from_json(m)).SOPInstanceUID: ds
        for m in node.retrieve_series_metadata(study, series)
    }
    assert sorted(metadata) == sorted(stored)
    for uid, ds in metadata.items():
        assert without_pixels(ds) == without_pixels(stored[uid])


def jpeg_baseline_ct(folder: Path) -> pydicom.Dataset:
    """An 8-bit CT image in JPEG Baseline whose file does not say it is lossy, as some senders
    write them."""
    from PIL import Image

    pixels = np.random.default_rng(7).integers(0, 255, (32, 32), dtype=np.uint8)
    jpeg = folder / "frame.jpg"
    Image.fromarray(pixels).save(jpeg, quality=50)
    ds = ct_dataset(generate_uid())
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.Rows = ds.Columns = 32
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([jpeg.read_bytes()])
    ds["PixelData"].VR = "OB"
    return ds


def test_pixels_decoded_from_a_lossy_syntax_say_they_are_lossy(
    web_node: WebNode, tmp_path: Path
) -> None:
    ds = jpeg_baseline_ct(tmp_path)
    sent = httpx.post(
        f"{web_node.dicomweb}/studies",
        content=body(part10(ds)),
        headers={"Content-Type": CONTENT_TYPE, **web_node.auth("modality-web")},
    )
    assert sent.status_code == 200, sent.text
    reader = DICOMwebClient(web_node.dicomweb, headers=web_node.auth("viewer"))
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    native = reader.retrieve_instance(*uids, media_types=("application/dicom",))
    assert native.SOPInstanceUID == ds.SOPInstanceUID
    assert (native.LossyImageCompression, native.LossyImageCompressionMethod) == (
        "01",
        "ISO_10918_1",
    )
    as_stored = reader.retrieve_instance(*uids, media_types=(("application/dicom", "*"),))
    assert as_stored.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert "LossyImageCompression" not in as_stored


def test_reading_needs_the_reader_role(web_node: WebNode, both) -> None:
    url = f"{web_node.dicomweb}/studies"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url, headers=web_node.auth("modality-web")).status_code == 403
    assert httpx.get(url, headers=web_node.auth("it-admin")).status_code == 200
    unknown = httpx.get(f"{url}/1.2.3.4/series/5.6/metadata", headers=web_node.auth("viewer"))
    assert unknown.status_code == 404
