"""The node as a DICOMweb peer of a real PACS: Orthanc pushes a real study to it by STOW-RS
(its DICOMweb plugin, `/dicom-web/servers/<node>/stow`), lung-quant runs, the SR and SEG go
back to Orthanc by STOW-RS, and the node serves the study with its results over QIDO/WADO-RS,
to OHIF pointed straight at it (one screenshot: each costs 25-40 s of the suite)."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.request
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import serve_ohif
from tests.e2e.test_results_to_pacs import instance_file, results_in, viewer_shot
from tests.node.web.conftest import WebNode, http_settings
from tests.peers import OrthancServer, free_port, storescu, wait_until

RULES = """
rules:
  - name: chest-ct
    match: {Modality: CT, source: dicomweb}
    pipelines: [lung-quant]
    destinations: [origin]
"""
SECRET = "orthanc-web-secret"


def put(orthanc: OrthancServer, path: str, payload: object) -> None:
    request = urllib.request.Request(
        orthanc.url + path,
        data=json.dumps(payload).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60):
        pass


@pytest.mark.slow
def test_orthanc_pushes_by_stow_and_the_node_serves_the_study_with_its_results(
    start_node, orthanc: OrthancServer, real_series, tmp_path: Path
) -> None:
    http_port = free_port()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    node = start_node(
        routing={"rules_file": str(rules)},
        http={
            "host": "127.0.0.1",
            "port": http_port,
            "auth": {
                "tokens": [
                    {
                        "name": "orthanc-web",
                        "sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
                        "roles": ["sender"],
                    }
                ],
                "anonymous": ["reader"],  # OHIF below reads without a login
            },
            # ohif-up's nginx forwards with its upstream's name as Host, as a proxy does
            "allowed_hosts": ["ohif_dicomweb"],
        },
        dicomweb={"orthanc-web": {"url": orthanc.dicomweb_url}},
    )
    files = real_series["lung-kernel"]
    storescu(orthanc.dicom_port, files, calling_ae="TESTSCU", called_ae="ORTHANC")
    (study,) = orthanc.get("/studies")
    # the port the node serves on: start_node draws its ports again when one was taken
    node_web = f"http://127.0.0.1:{node.settings['http']['port']}/dicom-web"
    put(
        orthanc,
        "/dicom-web/servers/ainode",
        {"Url": node_web, "HttpHeaders": {"Authorization": f"Bearer {SECRET}"}},
    )
    orthanc.post("/dicom-web/servers/ainode/stow", {"Resources": [study], "Synchronous": True})

    found = wait_until(lambda: results_in(orthanc, study), timeout=180, interval=1)
    assert len(found["SR"]) == 1 and len(found["SEG"]) == 1
    dispatches = node.status()["dispatches"]
    assert [(d["destination"], d["state"]) for d in dispatches] == [("origin", "succeeded")]

    by_source = {(s["modality"], s["source"], s["calling_ae"]) for s in node.series().values()}
    assert ("CT", "dicomweb", "orthanc-web") in by_source
    assert {("SR", "node"), ("SEG", "node")} <= {(m, src) for m, src, _ in by_source}
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    served = httpx.get(f"{node_web}/studies/{study_uid}/series").json()
    modalities = sorted(pydicom.Dataset.from_json(s).Modality for s in served)
    assert modalities == ["CT", "OT", "SEG", "SR"]  # OT: the key images

    # the SR's content tree, which a viewer reads from the metadata, as the PACS got it
    (sr_series,) = found["SR"]
    sr_uid = sr_series["MainDicomTags"]["SeriesInstanceUID"]
    (metadata,) = httpx.get(f"{node_web}/studies/{study_uid}/series/{sr_uid}/metadata").json()
    sent = pydicom.dcmread(instance_file(orthanc, sr_series, tmp_path))
    assert pydicom.Dataset.from_json(metadata).ContentSequence == sent.ContentSequence

    # OHIF drew the same SR from Orthanc (test_results_to_pacs.py); here the SEG over its CT
    shots = Path(__file__).resolve().parents[2] / "var" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with serve_ohif(node_web, tmp_path / "ohif") as ohif:
        viewer_shot(ohif, study_uid, shots / "node-seg.png", "--seg", "--yes", "--slice", "40")


@pytest.mark.slow
def test_orthanc_retrieves_a_compressed_study_from_the_node_with_every_uid_kept(
    start_node, orthanc: OrthancServer, real_series
) -> None:
    """Issue 25's first finding, with a real client: Orthanc's DICOMweb plugin pulls a JPEG
    Lossless study from the node by WADO-RS; every SOP Instance UID it then holds is one the
    scanner sent, and the pixels are the same."""
    port = free_port()
    node = start_node(http=http_settings(port), workers={"count": 0})
    web = WebNode(node)
    files = real_series["covid"][:12]
    storescu(web.node.port, files)
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    put(
        orthanc,
        "/dicom-web/servers/ainode",
        {"Url": web.dicomweb, "HttpHeaders": web.auth("viewer")},
    )
    orthanc.post("/dicom-web/servers/ainode/retrieve", {"Resources": [{"Study": study}]})
    held = wait_until(lambda: len(orthanc.get("/instances")) == len(files) and orthanc, 60)
    uids = {}
    for instance in held.get("/instances"):
        tags = held.get(f"/instances/{instance}/simplified-tags")
        uids[tags["SOPInstanceUID"]] = instance
    assert set(uids) == set(sent)
    for uid, instance in list(uids.items())[:3]:
        request = urllib.request.Request(f"{held.url}/instances/{instance}/file")
        with urllib.request.urlopen(request, timeout=60) as answer:
            pulled = pydicom.dcmread(io.BytesIO(answer.read()))
        assert (pulled.pixel_array == pydicom.dcmread(sent[uid]).pixel_array).all()
