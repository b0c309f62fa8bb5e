"""Results back to a real PACS: Orthanc sends a real study to `ainode serve`, lung-quant runs,
and the SR and SEG arrive in Orthanc, in the same study, by C-STORE or STOW-RS, and open in
OHIF; a PACS that is down gets them once it is back; nothing is duplicated."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.conftest import serve_ohif
from tests.dicom_checks import dciodvfy_errors
from tests.e2e.test_routing import uid_of
from tests.peers import NodeProcess, OrthancServer, free_port, storescu, wait_until

RULES = """
rules:
  - name: chest-ct
    match: {Modality: CT}
    pipelines: [lung-quant]
    destinations: [DESTINATIONS]
"""


def start_node_for(
    start_node: Callable[..., NodeProcess],
    orthanc: OrthancServer,
    tmp_path: Path,
    destinations: str,
) -> NodeProcess:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("DESTINATIONS", destinations))
    return start_node(
        port=orthanc.node_port,
        routing={"rules_file": str(rules)},
        peers={
            "pacs": {
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "commitment": True,  # delivered when Orthanc's report commits it
            },
            "offline": {"ae_title": "GONE", "host": "127.0.0.1", "port": free_port()},
        },
        dicomweb={"pacs-web": {"url": orthanc.dicomweb_url, "key_images": True}},
        dispatch={"retry_base_seconds": 1, "retry_max_seconds": 2},
    )


def upload_and_send(orthanc: OrthancServer, files: list[Path]) -> str:
    """Store the series in Orthanc, then have Orthanc send its study to the node."""
    storescu(orthanc.dicom_port, files, calling_ae="TESTSCU", called_ae="ORTHANC")
    (study,) = orthanc.get("/studies")
    orthanc.post("/modalities/AINODE/store", {"Resources": [study], "Synchronous": True})
    return study


def series_by_modality(orthanc: OrthancServer, study: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for series in orthanc.get(f"/studies/{study}/series"):
        found.setdefault(series["MainDicomTags"]["Modality"], []).append(series)
    return found


def results_in(orthanc: OrthancServer, study: str) -> dict[str, list[dict]] | None:
    found = series_by_modality(orthanc, study)
    return found if "SR" in found and "SEG" in found else None


def instance_file(orthanc: OrthancServer, series: dict, folder: Path) -> Path:
    (instance,) = series["Instances"]
    path = folder / f"{instance}.dcm"
    path.write_bytes(orthanc.get(f"/instances/{instance}/file"))
    return path


@pytest.mark.slow
def test_results_arrive_in_the_same_study_by_c_store_and_open_in_ohif(
    start_node, orthanc: OrthancServer, real_series, tmp_path: Path
) -> None:
    node = start_node_for(start_node, orthanc, tmp_path, "origin, offline")
    files = real_series["lung-kernel"]
    study = upload_and_send(orthanc, files)
    found = wait_until(lambda: results_in(orthanc, study), timeout=120, interval=1)
    assert len(found["SR"]) == 1 and len(found["SEG"]) == 1
    assert "OT" not in found  # no key images: this destination did not ask for them

    sr_path = instance_file(orthanc, found["SR"][0], tmp_path)
    seg_path = instance_file(orthanc, found["SEG"][0], tmp_path)
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(seg_path) == []
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    sr, seg = pydicom.dcmread(sr_path), pydicom.dcmread(seg_path)
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == source.StudyInstanceUID
    # the SEG went as stored, deflated (a peer that refuses Deflate gets it inflated)
    (seg_instance,) = found["SEG"][0]["Instances"]
    seg_syntax = orthanc.get(f"/instances/{seg_instance}/metadata/TransferSyntax")
    assert seg_syntax == DeflatedExplicitVRLittleEndian.encode()

    (job,) = [j for j in node.status()["jobs"] if j["series_instance_uid"] == uid_of(files)]
    expected = {
        r["name"]: {m["concept"]["value"]: m["value"] for m in r["measurements"]}
        for r in job["result"]["regions"]
    }
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    for group in report.content.get_image_measurement_groups():
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values == pytest.approx(expected[str(group.tracking_identifier)])
    source_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
        for item in frame.DerivationImageSequence[0].SourceImageSequence
    }
    assert referenced == source_uids

    # delivered once Orthanc committed it; one destination down never holds back another
    def committed() -> dict | None:
        dispatches = {d["destination"]: d for d in node.status()["dispatches"]}
        return dispatches if dispatches["origin"]["state"] == "succeeded" else None

    dispatches = wait_until(committed, timeout=60, interval=0.5)
    assert dispatches["origin"]["commitment"] == "committed"
    assert dispatches["origin"]["status"] == "2 of 2 stored"
    assert dispatches["offline"]["state"] in ("retrying", "running")

    # the same study sent again, and the job run again: still one SR and one SEG
    orthanc.post("/modalities/AINODE/store", {"Resources": [study], "Synchronous": True})
    assert node.cli("jobs", "retry", str(job["id"])).returncode == 0

    def resent() -> bool:
        origin = next(d for d in node.status()["dispatches"] if d["destination"] == "origin")
        first = dispatches["origin"]["finished_at"]
        return origin["state"] == "succeeded" and origin["finished_at"] != first

    def offline_failed() -> dict | None:  # its new dispatch, once it has been tried
        offline = next(d for d in node.status()["dispatches"] if d["destination"] == "offline")
        return offline if offline["error"] else None

    wait_until(resent, timeout=120, interval=1)
    offline = wait_until(offline_failed, timeout=60, interval=0.5)
    assert "no association with GONE@127.0.0.1" in offline["error"]
    again = series_by_modality(orthanc, study)
    assert len(again["SR"]) == 1 and len(again["SEG"]) == 1
    assert len(again["SR"][0]["Instances"]) == 1 and len(again["SEG"][0]["Instances"]) == 1

    # what the radiologist sees: the lungs overlaid on the tumour's image (17), the SR outlined
    shots = Path(__file__).resolve().parents[2] / "var" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with serve_ohif(orthanc.dicomweb_url, tmp_path / "ohif") as ohif:
        study_uid = str(source.StudyInstanceUID)
        viewer_shot(ohif, study_uid, shots / "seg-tumour.png", "--seg", "--yes", "--slice", "17")
        console = viewer_shot(ohif, study_uid, shots / "sr.png", "--sr")
    assert "No spatial coordinates" not in console


@pytest.mark.slow
def test_stow_rs_to_a_pacs_that_was_down_delivers_once_it_is_back(
    start_node, orthanc: OrthancServer, real_series, tmp_path: Path
) -> None:
    node = start_node_for(start_node, orthanc, tmp_path, "pacs-web")
    study = upload_and_send(orthanc, real_series["lung-kernel"])
    ports = (str(orthanc.dicom_port), orthanc.env["ORTHANC_HTTP_PORT"])
    orthanc.stop()

    def failed_once() -> dict | None:
        dispatches = node.status()["dispatches"]
        retrying = bool(dispatches) and dispatches[0]["state"] == "retrying"
        return dispatches[0] if retrying else None

    failed = wait_until(failed_once, timeout=120, interval=1)  # read once: a retry may start
    assert "STOW-RS" in failed["error"]
    orthanc.start(ports)
    found = wait_until(lambda: results_in(orthanc, study), timeout=60, interval=1)
    assert len(found["SR"]) == 1 and len(found["SEG"]) == 1
    (dispatch,) = node.status()["dispatches"]
    assert dispatch["state"] == "succeeded" and dispatch["attempts"] >= 2
    assert dispatch["status"] == "5 of 5 stored"  # this destination asked for key images
    (key_images,) = series_by_modality(orthanc, study)["OT"]
    assert len(key_images["Instances"]) == 3


def viewer_shot(ohif_url: str, study_uid: str, out: Path, *options: str) -> str:
    """Open the study in OHIF (headless Chromium); return the console log. Fails the test when
    the viewer did not render or reported an error. `--yes` answers the prompt OHIF shows for
    a SEG and a detection report; where none comes (a key image; the lung SR opened by its
    thumbnail) it would wait 5 s for one."""
    from tests.peers import TOOLS

    shot = subprocess.run(
        [str(TOOLS / "viewer-shot"), *options, ohif_url, study_uid, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = Path(f"{out}.console.txt")
    console = log.read_text(errors="replace") if log.exists() else ""
    assert shot.returncode == 0, shot.stdout + shot.stderr + console
    assert "Error Boundary" not in console and "Something went wrong" not in console, console
    return console
