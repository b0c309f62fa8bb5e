"""UPS-RS (IHE AIW-I) on a running node: a requester creates a workitem for a series the node
holds, the node claims it, reports progress and completes it with its results as output and
sends them where asked, while a worklist subscriber receives every change in order over its
WebSocket channel; a cancel request stops the node's job; invalid workitems, invalid state
changes and callers without the role are refused and change nothing."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.node.web.conftest import TOKENS, WebNode
from tests.peers import free_port, storescp, storescu, wait_until
from tests.phantoms import chest, chest_geometry, write_series

WORKLIST = "1.2.840.10008.5.1.4.34.5"
JSON = {"Content-Type": "application/dicom+json"}
STATE, EVENT_TYPE, PROGRESS = "00741000", "00001002", "00741002"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"}


def workitem(study: str, series: str | None = None, **changes: Any) -> list[dict]:
    """A workitem asking for `echo` on a study (and series), as DICOM JSON; `changes` set
    (None: remove) attributes by keyword."""
    ds = Dataset()
    ds.ScheduledProcedureStepPriority = "HIGH"
    ds.ProcedureStepLabel = "AI: geometry check"
    ds.ScheduledProcedureStepStartDateTime = "20261206120000"
    task = Dataset()
    task.CodeValue, task.CodingSchemeDesignator, task.CodeMeaning = "echo", "99AINODE", "echo"
    ds.ScheduledWorkitemCodeSequence = [task]
    source = Dataset()
    source.TypeOfInstances = "DICOM"
    source.StudyInstanceUID = study
    if series:
        source.SeriesInstanceUID = series
    ds.InputInformationSequence = [source]
    ds.InputReadinessState = "READY"
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return [ds.to_json_dict()]


def state_change(transaction: str, state: str) -> str:
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.ProcedureStepState = state
    return json.dumps(ds.to_json_dict())


def post(
    web: WebNode, path: str, body: Any, who: str = "it-admin", **kwargs: Any
) -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    headers = {**JSON, **web.auth(who), **kwargs.pop("headers", {})}
    return httpx.post(
        f"{web.dicomweb}{path}", content=content, headers=headers, timeout=30, **kwargs
    )


def get(web: WebNode, path: str, who: str = "viewer") -> httpx.Response:
    return httpx.get(f"{web.dicomweb}{path}", headers=web.auth(who), timeout=30)


def state_of(web: WebNode, uid: str) -> str:
    (found,) = get(web, f"/workitems/{uid}").json()
    return found[STATE]["Value"][0]


def sent_series(web: WebNode, folder: Path) -> tuple[str, str]:
    files = write_series(folder, chest_geometry(), chest())
    storescu(web.node.port, files)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
    wait_until(lambda: web.node.series().get(series, {}).get("state") == "complete", 60)
    return study, series


def channel(web: WebNode, ae_title: str, who: str = "viewer") -> Any:
    url = web.dicomweb.replace("http", "ws", 1) + f"/ws/subscribers/{ae_title}"
    return connect(url, additional_headers=web.auth(who), open_timeout=10)


def reports_until(socket: Any, done: Any, timeout: float = 90) -> list[dict]:
    """Event reports as they come, until `done(report)`."""
    reports = []
    while True:
        report = json.loads(socket.recv(timeout=timeout))
        reports.append(report)
        if done(report):
            return reports


def is_state(report: dict, state: str) -> bool:
    return report.get(STATE, {}).get("Value") == [state]


def test_the_node_performs_a_requested_task_and_a_subscriber_sees_every_change(
    start_web_node, tmp_path: Path
) -> None:
    pacs_port = free_port()
    web = start_web_node(
        workers={"count": 1},
        completion={"quiet_seconds": 1, "release_grace_seconds": 0.2},
        peers={
            "modality": {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 104},
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
        },
        workitems={"poll_seconds": 0.2},
    )
    study, series = sent_series(web, tmp_path / "ct")
    subscribed = post(web, f"/workitems/{WORKLIST}/subscribers/WATCHER", "", who="viewer")
    assert subscribed.status_code == 201, subscribed.text
    assert subscribed.headers["content-location"].endswith("/dicom-web/ws/subscribers/WATCHER")
    storage = Dataset()
    storage.DestinationAE = "PACS"
    output = Dataset()
    output.DICOMStorageSequence = [storage]
    uid = generate_uid()
    with storescp(pacs_port, tmp_path / "pacs"), channel(web, "WATCHER") as socket:
        created = post(
            web, f"/workitems?workitem={uid}",
            workitem(study, series, OutputDestinationSequence=[output]),
        )  # fmt: skip
        assert created.status_code == 201, created.text
        assert created.headers["location"].endswith(f"/dicom-web/workitems/{uid}")
        reports = reports_until(
            socket, lambda r: is_state(r, "COMPLETED") or is_state(r, "CANCELED")
        )
        wait_until(lambda: any((tmp_path / "pacs").iterdir()), 60)
    states = [r[STATE]["Value"][0] for r in reports if r[EVENT_TYPE]["Value"] == [1]]
    assert states == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
    progress = [i for i, r in enumerate(reports) if r[EVENT_TYPE]["Value"] == [3]]
    started = next(i for i, r in enumerate(reports) if is_state(r, "IN PROGRESS"))
    assert progress and all(started < i < len(reports) - 1 for i in progress)
    assert all(r["00001000"]["Value"] == [uid] for r in reports)

    (done,) = get(web, f"/workitems/{uid}").json()
    dataset = Dataset.from_json(done)
    assert dataset.ProcedureStepState == "COMPLETED" and "TransactionUID" not in dataset
    (performed,) = dataset.UnifiedProcedureStepPerformedProcedureSequence
    (output_series,) = performed.OutputInformationSequence
    assert output_series.StudyInstanceUID == study
    (result,) = output_series.ReferencedSOPSequence
    assert result.ReferencedSOPClassUID in SR_CLASSES
    (sent,) = list((tmp_path / "pacs").iterdir())
    assert pydicom.dcmread(sent).SOPInstanceUID == result.ReferencedSOPInstanceUID
    assert performed.PerformedWorkitemCodeSequence[0].CodeValue == "echo"
    events = httpx.get(f"{web.url}/api/v1/audit", headers=web.auth("it-admin")).json()
    trail = [
        (e["actor"], e["detail"]["action"]) for e in reversed(events) if e["kind"] == "workitem"
    ]
    assert trail == [("it-admin", "created"), ("AINODE", "claimed"), ("AINODE", "completed")]

    found = get(web, "/workitems?ProcedureStepState=COMPLETED").json()
    assert [Dataset.from_json(f).SOPInstanceUID for f in found] == [uid]
    assert get(web, "/workitems?ProcedureStepState=SCHEDULED").json() == []
    with channel(web, "WATCHER") as again, pytest.raises(TimeoutError):
        again.recv(timeout=1)  # reconnecting: nothing it already had


def test_a_cancel_request_stops_the_job_the_node_runs_for_it(
    start_web_node, tmp_path: Path
) -> None:
    web = start_web_node(
        workers={"count": 0},  # its job stays queued
        completion={"quiet_seconds": 1, "release_grace_seconds": 0.2},
        workitems={"poll_seconds": 0.2},
    )
    study, series = sent_series(web, tmp_path / "ct")
    uid = generate_uid()
    assert post(web, f"/workitems/{uid}/subscribers/RIS", "", who="viewer").status_code == 404
    assert post(web, f"/workitems?workitem={uid}", workitem(study, series)).status_code == 201
    assert post(web, f"/workitems/{uid}/subscribers/RIS", "", who="viewer").status_code == 201
    wait_until(lambda: state_of(web, uid) == "IN PROGRESS", 30)
    (job,) = web.node.status()["jobs"]
    assert job["state"] == "queued" and job["series_instance_uid"] == series
    reason = Dataset()
    reason.ReasonForCancellation = "ordered in error"
    asked = post(web, f"/workitems/{uid}/cancelrequest", [reason.to_json_dict()])
    assert asked.status_code == 202, asked.text
    wait_until(lambda: state_of(web, uid) == "CANCELED", 30)
    assert web.node.status()["jobs"][0]["state"] == "cancelled"
    with channel(web, "RIS") as socket:
        reports = reports_until(socket, lambda r: is_state(r, "CANCELED"), timeout=10)
    kinds = [r[EVENT_TYPE]["Value"][0] for r in reports]
    # first its state when subscribed (the node may have claimed it already), last CANCELED
    assert kinds[0] == 1 and not is_state(reports[0], "CANCELED")
    assert 2 in kinds  # the cancel request, told to the subscriber
    assert reports[-1]["00741238"]["Value"] == ["canceled on request"]
    assert post(web, f"/workitems/{uid}/cancelrequest", "").status_code == 409


def test_invalid_workitems_and_state_changes_are_refused_and_change_nothing(
    start_web_node, tmp_path: Path
) -> None:
    web = start_web_node(workers={"count": 0}, workitems={"poll_seconds": 0.2})
    study = generate_uid()  # a study the node does not hold: the workitem waits
    refused = {
        "no task": workitem(study, ScheduledWorkitemCodeSequence=None),
        "no priority": workitem(study, ScheduledProcedureStepPriority=None),
        "unknown task": workitem(study, ScheduledWorkitemCodeSequence=[_code("no-such-ai")]),
        "other scheme": workitem(study, ScheduledWorkitemCodeSequence=[_code("echo", "DCM")]),
        "claimed already": workitem(study, TransactionUID=generate_uid()),
        "not scheduled": workitem(study, ProcedureStepState="COMPLETED"),
        "bad priority": workitem(study, ScheduledProcedureStepPriority="URGENT"),
        "bad input": workitem("not-a-uid"),
        "unknown destination": workitem(study, OutputDestinationSequence=[_destination("NOBODY")]),
    }
    for why, body in refused.items():
        answer = post(web, "/workitems", body)
        assert answer.status_code == 400, (why, answer.text)
    answer = post(web, "/workitems", workitem(study, ScheduledWorkitemCodeSequence=[_code("x")]))
    assert "the tasks are the pipelines, coding scheme 99AINODE" in answer.json()["detail"]
    assert post(web, "/workitems", "{not json").status_code == 400
    assert post(web, "/workitems", [1, 2]).status_code == 400
    assert (
        post(web, "/workitems", workitem(study), headers={"Content-Type": "text/plain"}).status_code
        == 415
    )
    oversized = json.dumps(workitem(study, ProcedureStepLabel="x" * 64)) + " " * (1 << 20)
    assert post(web, "/workitems", oversized).status_code == 413
    assert get(web, "/workitems").json() == []  # nothing was created

    uid = generate_uid()
    assert post(web, f"/workitems?workitem={uid}", workitem(study)).status_code == 201
    assert post(web, f"/workitems?workitem={uid}", workitem(study)).status_code == 409
    mine, theirs = generate_uid(), generate_uid()
    change = f"/workitems/{uid}/state"
    assert _put(web, change, state_change(mine, "COMPLETED")).status_code == 409  # not claimed
    assert _put(web, change, state_change(mine, "IN PROGRESS")).status_code == 200
    assert _put(web, change, state_change(theirs, "IN PROGRESS")).status_code == 409
    assert _put(web, change, state_change(theirs, "COMPLETED")).status_code == 409
    assert _put(web, change, state_change(mine, "SCHEDULED")).status_code == 400
    assert _put(web, change, state_change("1.2.3", "DONE")).status_code == 400
    assert _put(web, change, "{}").status_code == 400
    assert state_of(web, uid) == "IN PROGRESS"
    progress = Dataset()
    item = Dataset()
    item.ProcedureStepProgress = 50
    progress.ProcedureStepProgressInformationSequence = [item]
    assert post(web, f"/workitems/{uid}", [progress.to_json_dict()]).status_code == 409
    progress.TransactionUID = mine
    assert post(web, f"/workitems/{uid}", [progress.to_json_dict()]).status_code == 200
    assert _put(web, f"{change}/PERFORMER", state_change(mine, "COMPLETED")).status_code == 200
    assert _put(web, change, state_change(mine, "CANCELED")).status_code == 409  # final
    assert state_of(web, uid) == "COMPLETED"

    waiting = generate_uid()
    assert post(web, f"/workitems?workitem={waiting}", workitem(study)).status_code == 201
    assert post(web, f"/workitems/{waiting}/cancelrequest/RIS", "").status_code == 202
    assert state_of(web, waiting) == "CANCELED"  # a SCHEDULED one is canceled at once

    assert get(web, f"/workitems/{generate_uid()}").status_code == 404
    assert get(web, "/workitems/1.2.x").status_code == 400
    assert get(web, "/workitems?ProcedureStepState=LATER").status_code == 400

    def found(query: str) -> list[str]:
        answer = get(web, f"/workitems?{query}")
        assert answer.status_code == 200, answer.text
        return sorted(Dataset.from_json(f).SOPInstanceUID for f in answer.json())

    other_study = generate_uid()
    patient = generate_uid()
    assert post(
        web, f"/workitems?workitem={patient}",
        workitem(other_study, PatientID="PID-9", PatientName="Doe^Jane"),
    ).status_code == 201  # fmt: skip
    assert found("PatientID=PID-9") == [patient]
    assert found("00100020=PID-9") == [patient]
    assert found("PatientName=doe*") == [patient]  # names without regard to case
    assert found(f"InputInformationSequence.StudyInstanceUID={other_study}") == [patient]
    assert found(f"SOPInstanceUID={uid}\\{waiting}") == sorted([uid, waiting])
    assert found("ScheduledWorkitemCodeSequence.CodeValue=ech?") == sorted([uid, waiting, patient])
    assert found("ScheduledProcedureStepStartDateTime=20261206-20261206") == sorted(
        [uid, waiting, patient]
    )
    assert found("ScheduledProcedureStepStartDateTime=20270101-") == []
    assert found("ProcedureStepState=SCHEDULED&PatientID=PID-9") == [patient]
    assert found("ProcedureStepState=COMPLETED&limit=1&offset=0") == [uid]
    answer = get(web, "/workitems?NoSuchKeyword=1&PatientID=PID-9")
    assert "NoSuchKeyword" in answer.headers["warning"] and len(answer.json()) == 1
    answer = get(web, '/workitems?%E2%82%AC"%0A=1')  # a key no header may hold as it is
    assert answer.status_code == 200 and '\\u20ac\\"' in answer.headers["warning"]
    assert get(web, f"/workitems?offset={2**63}").status_code == 400
    trail = [
        (e["actor"], e["detail"]["action"], e["detail"]["workitem"])
        for e in reversed(httpx.get(f"{web.url}/api/v1/audit", headers=web.auth("it-admin")).json())
        if e["kind"] == "workitem"
    ]  # oldest first; the refused requests left nothing
    assert trail == [
        ("it-admin", "created", uid), ("it-admin", "claimed", uid),
        ("PERFORMER", "completed", uid), ("it-admin", "created", waiting),
        ("RIS", "cancel requested", waiting), ("it-admin", "created", patient),
    ]  # fmt: skip
    assert post(web, f"/workitems/{WORKLIST}.1/subscribers/RIS", "").status_code == 501
    assert post(web, f"/workitems/{WORKLIST}/subscribers/{'A' * 17}", "").status_code == 400


def test_callers_without_the_role_are_refused(start_web_node) -> None:
    web = start_web_node(workers={"count": 0})
    study = generate_uid()
    anonymous = httpx.post(
        f"{web.dicomweb}/workitems", content=json.dumps(workitem(study)), headers=JSON
    )
    assert anonymous.status_code == 401
    assert post(web, "/workitems", workitem(study), who="viewer").status_code == 403
    assert post(web, "/workitems", workitem(study), who="modality-web").status_code == 403
    assert get(web, "/workitems", who="modality-web").status_code == 403
    uid = generate_uid()
    assert post(web, f"/workitems?workitem={uid}", workitem(study)).status_code == 201
    assert (
        _put(
            web, f"/workitems/{uid}/state", state_change(uid, "IN PROGRESS"), who="viewer"
        ).status_code
        == 403
    )
    assert post(web, f"/workitems/{uid}/cancelrequest", "", who="viewer").status_code == 403
    url = web.dicomweb.replace("http", "ws", 1) + "/ws/subscribers/WATCHER"
    for headers in ({}, web.auth("modality-web"), {"Authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 403
    assert state_of(web, uid) == "SCHEDULED"
    port = int(web.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # DNS rebinding
        raw.sendall(
            b"GET /dicom-web/ws/subscribers/WATCHER HTTP/1.1\r\nHost: evil.example\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            + f"Authorization: Bearer {TOKENS['viewer'][0]}\r\n\r\n".encode()
        )
        answer = raw.recv(200)
    assert answer.startswith(b"HTTP/1.1 403"), answer


def _put(web: WebNode, path: str, body: str, who: str = "it-admin") -> httpx.Response:
    headers = {**JSON, **web.auth(who)}
    return httpx.put(f"{web.dicomweb}{path}", content=body, headers=headers, timeout=30)


def _code(value: str, scheme: str = "99AINODE") -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, value
    return code


def _destination(ae_title: str) -> Dataset:
    storage = Dataset()
    storage.DestinationAE = ae_title
    output = Dataset()
    output.DICOMStorageSequence = [storage]
    return output


ROUTE_ECHO = """
rules:
  - name: every-ct
    match: {Modality: CT}
    pipelines: [echo]
"""


def test_jobs_the_rules_start_are_announced_as_workitems(start_web_node, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ROUTE_ECHO)
    web = start_web_node(
        workers={"count": 1},
        routing={"rules_file": str(rules)},
        completion={"quiet_seconds": 1, "release_grace_seconds": 0.2},
        workitems={"announce": True, "poll_seconds": 0.2},
    )
    assert (
        post(web, f"/workitems/{WORKLIST}/subscribers/WATCHER", "", who="viewer").status_code == 201
    )
    with channel(web, "WATCHER") as socket:
        _, series = sent_series(web, tmp_path / "ct")
        reports = reports_until(
            socket, lambda r: is_state(r, "COMPLETED") or is_state(r, "CANCELED")
        )
    states = [r[STATE]["Value"][0] for r in reports if r[EVENT_TYPE]["Value"] == [1]]
    assert states == ["IN PROGRESS", "COMPLETED"]  # announced as it started
    (found,) = get(web, "/workitems").json()
    dataset = Dataset.from_json(found)
    assert dataset.InputInformationSequence[0].SeriesInstanceUID == series
    assert dataset.ScheduledWorkitemCodeSequence[0].CodeValue == "echo"
    (job,) = web.node.status()["jobs"]
    assert job["state"] == "succeeded"


def test_a_study_the_node_lacks_is_fetched_from_the_pacs_for_its_workitem(
    start_web_node, orthanc, tmp_path: Path
) -> None:
    """Orthanc holds the study; the workitem names it; the node C-MOVEs it from Orthanc,
    performs the task and completes. A study Orthanc does not hold cancels its workitem."""
    files = write_series(tmp_path / "ct", chest_geometry(), chest())
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    scout = write_series(
        tmp_path / "scout", chest_geometry(), chest(),
        image_type=lambda k: ["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )[:3]  # fmt: skip
    for path in scout:  # a localizer in the same study: no input of the task
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = header.StudyInstanceUID
        ds.save_as(path)
    storescu(orthanc.dicom_port, files + scout, calling_ae="TESTSCU", called_ae="ORTHANC")
    web = start_web_node(
        port=orthanc.node_port,
        workers={"count": 1},
        completion={"quiet_seconds": 1, "release_grace_seconds": 0.2},
        peers={
            "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
        },
        workitems={"fetch_from": "pacs", "poll_seconds": 0.2},
    )
    uid, missing = generate_uid(), generate_uid()
    assert (
        post(web, f"/workitems?workitem={uid}", workitem(str(header.StudyInstanceUID))).status_code
        == 201
    )
    assert post(web, f"/workitems?workitem={missing}", workitem(generate_uid())).status_code == 201
    wait_until(lambda: state_of(web, uid) == "COMPLETED", 120, interval=0.5)
    wait_until(lambda: state_of(web, missing) == "CANCELED", 120, interval=0.5)
    (done,) = get(web, f"/workitems/{uid}").json()
    performed = Dataset.from_json(done).UnifiedProcedureStepPerformedProcedureSequence[0]
    assert performed.OutputInformationSequence[0].ReferencedSOPSequence
    assert web.node.series()[str(header.SeriesInstanceUID)]["instances"] == len(files)
    (job,) = web.node.status()["jobs"]  # the CT series only, not the localizer
    assert job["series_instance_uid"] == header.SeriesInstanceUID
    (canceled,) = get(web, f"/workitems/{missing}").json()
    assert "not fetched from pacs" in Dataset.from_json(canceled).ReasonForCancellation
