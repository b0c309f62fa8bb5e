"""The Query/Retrieve SCP as a real server: DCMTK findscu, movescu and getscu, Orthanc's own
C-FIND and C-MOVE, and pynetdicom for what those tools cannot send (a C-CANCEL mid-way, a
refused peer, a broken identifier). C-FIND and QIDO-RS answer the same query alike."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests import dicom_wire as wire
from tests.node.edge.test_scp import ct_dataset
from tests.node.web.conftest import TOKENS, http_settings
from tests.peers import (
    DCMTK_ENV,
    REAL_SERIES,
    NodeProcess,
    OrthancServer,
    dcmtk,
    free_port,
    storescp,
    storescu,
    wait_until,
)

StartNode = Callable[..., NodeProcess]
WORKSTATION = {"ae_title": "WORKSTATION", "host": "127.0.0.1", "port": 104,
               "allow": ["find", "move", "get"]}  # fmt: skip
BROWSER = {"ae_title": "BROWSER", "host": "127.0.0.1", "port": 104, "allow": ["find"]}
STUDIES = [  # patient name, patient ID, study date, description, instances
    ("Doe^Jane", "P1", "20240105", "CHEST CT", 3),
    ("DOE^JOHN", "P2", "20240210", "chest low dose", 2),
    ("DOE^JOHN", "P2", "20231120", "Thorax", 1),
    ("Müller^Jürgen", "P3", "20240301", "CHEST CT", 1),
]


def catalog_files(folder: Path) -> list[Path]:
    """Four synthetic studies of three patients, each one CT series."""
    folder.mkdir()
    paths = []
    for name, patient_id, date, description, count in STUDIES:
        study, series = generate_uid(), generate_uid()
        for number in range(1, count + 1):
            ds = ct_dataset(generate_uid(), study)
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.SeriesInstanceUID = series
            ds.PatientName, ds.PatientID, ds.StudyDate = name, patient_id, date
            ds.StudyDescription, ds.InstanceNumber, ds.SeriesNumber = description, number, 1
            path = folder / f"{patient_id}-{date}-{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def real_files(count: int) -> list[Path]:
    """The first slices of a real COVID-CT-MD series (JPEG Lossless), if the data is here."""
    folder = REAL_SERIES["covid"]
    if not folder.exists():
        return []
    return sorted(folder.glob("*.dcm"))[:count]


def findscu(node: NodeProcess, out: Path, *keys: str, root: str = "-S") -> list[Dataset]:
    """C-FIND with DCMTK findscu as WORKSTATION; the responses' identifiers."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = [arg for key in keys for arg in ("-k", key)]
    result = subprocess.run(
        [
            dcmtk("findscu"),
            root,
            "-aet",
            "WORKSTATION",
            "-aec",
            "AINODE",
            "-X",
            "-od",
            str(out),
            *args,
            "127.0.0.1",
            str(node.port),
        ],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def qido(url: str, level: str, params: dict[str, str]) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {TOKENS['viewer'][0]}"}
    response = httpx.get(f"{url}/dicom-web/{level}", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return list(response.json())


def dataset_bytes(path: Path) -> str:
    """The hash of a Part 10 file's dataset, after its file meta information."""
    _, offset = split_dataset(path)
    return hashlib.sha256(path.read_bytes()[offset:]).hexdigest()


def audited(node: NodeProcess, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """The audit trail's events of `kind`: (actor, facts)."""
    events = json.loads(node.cli("audit", "list", "--json").stdout)
    return [(e["actor"], e["detail"]) for e in events if e["kind"] == kind]


def stored_hashes(node: NodeProcess) -> dict[str, str]:
    return {path.stem: dataset_bytes(path) for path in node.storage.rglob("*.dcm")}


@pytest.fixture
def catalog(tmp_path: Path, start_node: StartNode) -> Iterator[tuple[NodeProcess, str]]:
    """A node holding the four studies (and real slices when the data is here), with its
    HTTP server on; its URL."""
    port = free_port()
    node = start_node(
        workers={"count": 0},
        peers={"workstation": WORKSTATION, "browser": BROWSER},
        http=http_settings(port),
    )
    storescu(node.port, catalog_files(tmp_path / "catalog") + real_files(2))
    yield node, f"http://127.0.0.1:{port}"


def test_findscu_at_every_level_of_both_information_models(
    catalog: tuple[NodeProcess, str], tmp_path: Path
) -> None:
    node, _ = catalog
    out = tmp_path / "find"
    studies = findscu(
        node, out, "QueryRetrieveLevel=STUDY", "PatientName=doe*", "StudyInstanceUID",
        "StudyDate", "NumberOfStudyRelatedInstances", "ModalitiesInStudy", "IssuerOfPatientID",
    )  # fmt: skip
    assert sorted((str(s.PatientName), s.StudyDate) for s in studies) == [
        ("DOE^JOHN", "20231120"), ("DOE^JOHN", "20240210"), ("Doe^Jane", "20240105"),
    ]  # fmt: skip
    jane = next(s for s in studies if str(s.PatientName) == "Doe^Jane")
    assert jane.NumberOfStudyRelatedInstances == 3 and jane.ModalitiesInStudy == "CT"
    assert jane.QueryRetrieveLevel == "STUDY" and jane.RetrieveAETitle == "AINODE"
    assert jane.IssuerOfPatientID == ""  # asked for, not kept: returned empty
    assert "PatientID" not in jane  # not asked for, not returned

    # Case kept for text (StudyDescription), not for names; ranges; UID lists.
    chest = findscu(node, out, "QueryRetrieveLevel=STUDY", "StudyDescription=CHEST*")
    assert len(chest) == 2
    recent = findscu(node, out, "QueryRetrieveLevel=STUDY", "StudyDate=20240201-", "PatientID")
    assert sorted(s.PatientID for s in recent) == ["P2", "P3"]
    both = "\\".join(s.StudyInstanceUID for s in studies[:2])
    listed = findscu(node, out, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={both}")
    assert {s.StudyInstanceUID for s in listed} == {s.StudyInstanceUID for s in studies[:2]}

    # Patient root: patients, then a patient's studies, series and images.
    patients = findscu(
        node, out, "QueryRetrieveLevel=PATIENT", "PatientID=P*", "PatientName",
        "NumberOfPatientRelatedStudies", root="-P",
    )  # fmt: skip
    assert sorted((p.PatientID, p.NumberOfPatientRelatedStudies) for p in patients) == [
        ("P1", 1), ("P2", 2), ("P3", 1),
    ]  # fmt: skip
    muller = next(p for p in patients if p.PatientID == "P3")
    assert muller.PatientName == "Müller^Jürgen"  # answered in UTF-8 (ISO_IR 192)
    series = findscu(
        node, out, "QueryRetrieveLevel=SERIES", "PatientID=P2", "StudyInstanceUID",
        "SeriesInstanceUID", "NumberOfSeriesRelatedInstances", "Modality=CT", root="-P",
    )  # fmt: skip
    assert sorted(s.NumberOfSeriesRelatedInstances for s in series) == [1, 2]
    images = findscu(
        node, out, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={jane.StudyInstanceUID}",
        "SOPInstanceUID", "InstanceNumber",
    )  # fmt: skip
    assert sorted(i.InstanceNumber for i in images) == [1, 2, 3]
    assert all(i.StudyInstanceUID == jane.StudyInstanceUID for i in images)  # unique keys above
    assert "SeriesInstanceUID" in images[0]
    queries = audited(node, "query")
    assert ("WORKSTATION", {"level": "STUDY", "matches": 3}) in queries and len(queries) == 7


QUERIES: list[tuple[str, str, dict[str, str]]] = [
    ("studies", "STUDY", {}),
    ("studies", "STUDY", {"PatientName": "*john"}),
    ("studies", "STUDY", {"PatientName": "doe^jane"}),
    ("studies", "STUDY", {"PatientID": "P?"}),
    ("studies", "STUDY", {"StudyDescription": "chest*"}),
    ("studies", "STUDY", {"StudyDescription": "*CT"}),
    ("studies", "STUDY", {"StudyDate": "20240101-20240228"}),
    ("studies", "STUDY", {"StudyDate": "-20231231"}),
    ("studies", "STUDY", {"StudyDate": "20240301"}),
    ("studies", "STUDY", {"ModalitiesInStudy": "CT"}),
    ("studies", "STUDY", {"ModalitiesInStudy": "MR"}),
    ("studies", "STUDY", {"AccessionNumber": ""}),
    ("series", "SERIES", {"Modality": "CT", "SeriesNumber": "1"}),
    ("series", "SERIES", {"PatientID": "P2"}),
    ("instances", "IMAGE", {"InstanceNumber": "2"}),
    ("instances", "IMAGE", {"PatientName": "M*"}),
]
UNIQUE = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E",
        "SOPInstanceUID": "00080018"}  # fmt: skip


def test_cfind_and_qido_match_the_same_set(
    catalog: tuple[NodeProcess, str], tmp_path: Path
) -> None:
    """One node for every query (a node start costs more than all the queries)."""
    node, url = catalog
    for resource, level, keys in QUERIES:
        unique = UNIQUE[level]
        asked = [f"{key}={value}" for key, value in keys.items()]
        dimse = findscu(node, tmp_path / "find", f"QueryRetrieveLevel={level}", unique, *asked)
        web = qido(url, resource, {key: value for key, value in keys.items() if value})
        found = {str(ds[unique].value) for ds in dimse}
        assert found == {entry[TAGS[unique]]["Value"][0] for entry in web}, keys
        assert found or keys.get("ModalitiesInStudy") == "MR", keys  # the catalog holds matches


def find_with_pynetdicom(port: int, calling_ae: str, identifier: Dataset) -> list[int]:
    """The statuses of a Study Root C-FIND sent by pynetdicom as `calling_ae`."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    try:
        return [
            int(status.Status)
            for status, _ in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            )
        ]
    finally:
        assoc.release()


def test_queries_refused_with_a_clear_status(catalog: tuple[NodeProcess, str]) -> None:
    node, _ = catalog
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientName = "STUDY", "*"
    assert find_with_pynetdicom(node.port, "STORESCU", query) == [0x0124]  # may only send
    assert find_with_pynetdicom(node.port, "BROWSER", query)[-1] == 0x0000
    no_level = Dataset()
    no_level.PatientName = "*"
    assert find_with_pynetdicom(node.port, "BROWSER", no_level) == [0xA900]
    patient_level = Dataset()
    patient_level.QueryRetrieveLevel = "PATIENT"  # not in the Study Root model
    assert find_with_pynetdicom(node.port, "BROWSER", patient_level) == [0xA900]
    bad_date = Dataset()
    bad_date.QueryRetrieveLevel, bad_date.StudyDate = "STUDY", "20241345"
    assert find_with_pynetdicom(node.port, "BROWSER", bad_date) == [0xC000]
    unsupported = Dataset()  # a key the catalog does not keep, with a value: FF01
    unsupported.QueryRetrieveLevel, unsupported.InstitutionName = "STUDY", "General"
    assert set(find_with_pynetdicom(node.port, "BROWSER", unsupported)[:-1]) == {0xFF01}
    # A peer allowed to find may not retrieve.
    ae = AE(ae_title="BROWSER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    study = Dataset()
    study.QueryRetrieveLevel, study.StudyInstanceUID = "STUDY", "1.2.3"
    try:
        statuses = [
            int(s.Status)
            for s, _ in assoc.send_c_move(
                study, "BROWSER", StudyRootQueryRetrieveInformationModelMove
            )
        ]
    finally:
        assoc.release()
    assert statuses == [0x0124]
    log = node.log()
    assert "C_FIND_RQ from STORESCU refused" in log and "Doe" not in log  # no PHI logged


def test_broken_query_messages_get_a_status_and_the_association_goes_on(
    start_node: StartNode,
) -> None:
    """What no tool sends: an identifier that is not a dataset, a C-FIND without one, a
    C-MOVE on a C-FIND context, a UID list past the node's bound."""
    node = start_node(workers={"count": 0}, peers={"workstation": WORKSTATION})
    contexts = [
        wire.presentation_context(1, wire.STUDY_ROOT_FIND, [ImplicitVRLittleEndian]),
        wire.presentation_context(3, wire.VERIFICATION, [ImplicitVRLittleEndian]),
    ]
    many = Dataset()
    many.QueryRetrieveLevel = "STUDY"
    many.StudyInstanceUID = [f"1.2.{n}" for n in range(1001)]
    requests = [
        (wire.c_find_rq(), b"\xff\xff\x00\x10garbage!"),
        (wire.c_find_rq(message_id=2, with_dataset=False), None),
        (wire.c_find_rq(message_id=3, command_field=0x0021), b"\x08\x00\x52\x00\x06\x00STUDY "),
        (wire.c_find_rq(message_id=4), encode(many, True, True)),
    ]
    statuses = []
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:
        raw.sendall(wire.associate_rq(calling="WORKSTATION", contexts=contexts))
        assert wire.read_pdu(raw)[0] == 0x02
        for command, identifier in requests:
            raw.sendall(wire.p_data(1, command, command=True))
            if identifier is not None:
                raw.sendall(wire.p_data(1, identifier, command=False))
            statuses.append(wire.status_of(wire.read_pdu(raw)[1]))
        raw.sendall(wire.p_data(3, wire.c_echo_rq(5), command=True))
        statuses.append(wire.status_of(wire.read_pdu(raw)[1]))
        raw.sendall(wire.RELEASE_RQ)
        assert wire.read_pdu(raw)[0] == 0x06
    assert statuses == [0xA900, 0xC000, 0x0122, 0xC000, 0x0000]
    assert "Traceback" not in node.log()


def test_movescu_and_getscu_retrieve_the_stored_bytes(
    tmp_path: Path, start_node: StartNode
) -> None:
    pacs_port = free_port()
    pacs = {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
    node = start_node(workers={"count": 0}, peers={"workstation": WORKSTATION, "pacs": pacs})
    files = catalog_files(tmp_path / "catalog")[:3] + real_files(3)  # Jane's study, real slices
    storescu(node.port, files)
    stored = stored_hashes(node)
    jane = pydicom.dcmread(files[0])

    moved = tmp_path / "moved"
    with storescp(pacs_port, moved, "+xa", "+B"):  # PACS: every syntax, bytes as sent
        result = subprocess.run(
            [dcmtk("movescu"), "-S", "-aet", "WORKSTATION", "-aec", "AINODE", "-aem", "PACS",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={jane.StudyInstanceUID}",
             "127.0.0.1", str(node.port)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert wait_until(lambda: len(list(moved.glob("*"))) == 3, 10)
    received = {pydicom.dcmread(p).SOPInstanceUID: dataset_bytes(p) for p in moved.iterdir()}
    assert received == {uid: stored[uid] for uid in received} and len(received) == 3

    if len(files) > 3:  # the real slices, JPEG Lossless as stored, by C-GET on one association
        real = pydicom.dcmread(files[3])
        got = tmp_path / "got"
        got.mkdir()
        result = subprocess.run(
            [dcmtk("getscu"), "-S", "+xs", "+B", "-aet", "WORKSTATION", "-aec", "AINODE",
             "-od", str(got),
             "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={real.StudyInstanceUID}",
             "-k", f"SeriesInstanceUID={real.SeriesInstanceUID}", "127.0.0.1", str(node.port)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        fetched = {pydicom.dcmread(p).SOPInstanceUID: p for p in got.iterdir()}
        assert len(fetched) == 3
        for uid, path in fetched.items():
            assert (
                pydicom.dcmread(path).file_meta.TransferSyntaxUID
                == real.file_meta.TransferSyntaxUID
            )
            assert dataset_bytes(path) == stored[uid]

        # Peers that take no JPEG: the node decodes, and every UID stays the stored one.
        series_keys = ["-k", "QueryRetrieveLevel=SERIES",
                       "-k", f"StudyInstanceUID={real.StudyInstanceUID}",
                       "-k", f"SeriesInstanceUID={real.SeriesInstanceUID}"]  # fmt: skip
        plain_get, plain_move = tmp_path / "plain-get", tmp_path / "plain-move"
        plain_get.mkdir()
        result = subprocess.run(
            [dcmtk("getscu"), "-S", "-aet", "WORKSTATION", "-aec", "AINODE", "-od",
             str(plain_get), *series_keys, "127.0.0.1", str(node.port)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        with storescp(pacs_port, plain_move):  # DCMTK's default: uncompressed syntaxes only
            result = subprocess.run(
                [dcmtk("movescu"), "-S", "-aet", "WORKSTATION", "-aec", "AINODE", "-aem", "PACS",
                 *series_keys, "127.0.0.1", str(node.port)],
                env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr[-2000:]
            assert wait_until(lambda: len(list(plain_move.glob("*"))) == 3, 10)
        originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in files[3:]}
        for path in [*plain_get.iterdir(), *plain_move.iterdir()]:
            copy = pydicom.dcmread(path)
            original = originals[copy.SOPInstanceUID]  # the stored UID, not a new one
            assert not copy.file_meta.TransferSyntaxUID.is_compressed
            assert (copy.StudyInstanceUID, copy.SeriesInstanceUID) == (
                original.StudyInstanceUID, original.SeriesInstanceUID
            )  # fmt: skip
            assert np.array_equal(copy.pixel_array, original.pixel_array)  # lossless

    unknown = subprocess.run(
        [dcmtk("movescu"), "-v", "-S", "-aet", "WORKSTATION", "-aec", "AINODE", "-aem", "NOWHERE",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={jane.StudyInstanceUID}",
         "127.0.0.1", str(node.port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Refused: MoveDestinationUnknown" in unknown.stdout + unknown.stderr  # A801
    down = subprocess.run(  # the PACS (storescp) has stopped: no sub-operation can be done
        [dcmtk("movescu"), "-v", "-S", "-aet", "WORKSTATION", "-aec", "AINODE", "-aem", "PACS",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={jane.StudyInstanceUID}",
         "127.0.0.1", str(node.port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    said = down.stdout + down.stderr
    assert "Refused: OutOfResourcesSubOperations" in said, said[-2000:]  # A702
    retrieves = audited(node, "retrieve")
    assert ("WORKSTATION", {
        "service": "C-MOVE", "level": "STUDY", "destination": "PACS", "instances": 3, "failed": 0,
        "studies": [str(jane.StudyInstanceUID)],
    }) in retrieves  # fmt: skip
    assert len(retrieves) == (5 if len(files) > 3 else 2)
    assert ("WORKSTATION", {
        "service": "C-MOVE", "level": "STUDY", "destination": "PACS", "instances": 0, "failed": 3,
        "studies": [str(jane.StudyInstanceUID)],
    }) in retrieves  # fmt: skip


def test_a_cancel_stops_a_get_and_a_get_without_its_key_is_refused(
    tmp_path: Path, start_node: StartNode
) -> None:
    node = start_node(workers={"count": 0}, peers={"workstation": WORKSTATION})
    files = catalog_files(tmp_path / "catalog")[:3]  # one study of three instances
    storescu(node.port, files)
    study = Dataset()
    study.QueryRetrieveLevel = "STUDY"
    study.StudyInstanceUID = pydicom.dcmread(files[0]).StudyInstanceUID

    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    received: list[str] = []
    cancel_sent = threading.Event()

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        if len(received) == 1:  # cancel inside the first sub-operation
            context = next(
                cx for cx in event.assoc.accepted_contexts
                if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet
            )  # fmt: skip
            event.assoc.send_c_cancel(1, context.context_id)
            cancel_sent.set()
        return 0x0000

    assoc = ae.associate(
        "127.0.0.1", node.port, ae_title="AINODE",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )  # fmt: skip
    assert assoc.is_established
    try:
        responses = list(
            assoc.send_c_get(study, StudyRootQueryRetrieveInformationModelGet, msg_id=1)
        )
        no_key = Dataset()
        no_key.QueryRetrieveLevel = "SERIES"  # no SeriesInstanceUID: would match everything
        refused = list(assoc.send_c_get(no_key, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    assert cancel_sent.is_set() and len(received) == 1
    final, _ = responses[-1]
    assert int(final.Status) == 0xFE00
    assert (final.NumberOfCompletedSuboperations, final.NumberOfRemainingSuboperations) == (1, 2)
    assert [int(status.Status) for status, _ in refused] == [0xA900]


@pytest.mark.slow
def test_orthanc_finds_and_moves_from_the_node(
    tmp_path: Path, start_node: StartNode, orthanc: OrthancServer
) -> None:
    orthanc_peer = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
                    "allow": ["find", "move"]}  # fmt: skip
    node = start_node(port=orthanc.node_port, workers={"count": 0}, peers={"orthanc": orthanc_peer})
    files = catalog_files(tmp_path / "catalog") + real_files(2)
    storescu(node.port, files)
    stored = stored_hashes(node)

    query = orthanc.post(
        "/modalities/AINODE/query",
        {"Level": "Study", "Query": {"PatientName": "doe*", "StudyDate": "20240101-"}},
    )
    answers = orthanc.get(f"/queries/{query['ID']}/answers?expand")
    assert sorted(a["0008,0020"]["Value"] for a in answers) == ["20240105", "20240210"]

    orthanc.post(f"/queries/{query['ID']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
    held = orthanc.get("/instances")
    assert len(held) == 5  # Jane's three and John's two
    for instance in held:
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
        copy = tmp_path / f"{instance}.dcm"
        copy.write_bytes(orthanc.get(f"/instances/{instance}/file"))
        assert dataset_bytes(copy) == stored[tags["SOPInstanceUID"]]
