"""The admin API and the health endpoints of a real node: what `ainode status` shows, jobs
retried and cancelled, fetches queued; readiness that names what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from pydicom.uid import generate_uid

from tests.node.edge.test_scp import ct_dataset
from tests.node.web.conftest import WebNode
from tests.node.web.test_stow import body, part10, post
from tests.peers import wait_until

RULES = """
rules:
  - name: ct
    match: {Modality: CT}
    pipelines: [echo]
"""


def api(web: WebNode, method: str, path: str, who: str = "it-admin", **kwargs) -> httpx.Response:
    headers = web.auth(who) | kwargs.pop("headers", {})
    return httpx.request(method, f"{web.url}/api/v1{path}", headers=headers, **kwargs)


def test_status_jobs_and_fetches_through_the_api(start_web_node, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    web = start_web_node(
        workers={"count": 0},  # jobs stay queued: the API acts on them
        routing={"rules_file": str(rules)},
        completion={"quiet_seconds": 1, "release_grace_seconds": 0.2},
    )
    ds = ct_dataset(generate_uid())
    assert post(web, body(part10(ds))).status_code == 200

    job = wait_until(lambda: (api(web, "GET", "/jobs", "viewer").json() or [None])[0], 30)
    assert job["state"] == "queued" and job["pipeline"] == "echo"
    status = api(web, "GET", "/status", "viewer").json()
    assert [s["source"] for s in status["series"]] == ["dicomweb"]
    assert status["rules"]["error"] is None and status["disk"]["accepting"] is True

    job_id = job["id"]
    assert api(web, "POST", f"/jobs/{job_id}/cancel", "viewer").status_code == 403
    cancelled = api(web, "POST", f"/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["by"] == "it-admin"
    assert api(web, "POST", f"/jobs/{job_id}/cancel").status_code == 409
    assert api(web, "POST", f"/jobs/{job_id}/retry").json()["state"] == "queued"
    missing = api(web, "POST", "/jobs/9999/retry")
    assert missing.status_code == 404 and missing.json()["detail"] == "no job 9999"

    unknown = api(web, "POST", "/fetches", json={"source": "nowhere", "study": "1.2.3"})
    assert unknown.status_code == 422
    vague = api(web, "POST", "/fetches", json={"source": "modality"})
    assert vague.status_code == 422
    queued = api(web, "POST", "/fetches", json={"source": "modality", "accession": "A1"})
    assert queued.status_code == 202
    (listed,) = api(web, "GET", "/fetches", "viewer").json()
    assert listed["id"] == queued.json()["id"] and listed["query"] == {"accession": "A1"}


def test_readiness_names_what_is_wrong(start_web_node, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    web = start_web_node(workers={"count": 0}, routing={"rules_file": str(rules)})
    assert httpx.get(f"{web.url}/healthz").json() == {"status": "ok"}
    # The HTTP server may answer before the node has recorded its processes: not yet ready.
    ready = wait_until(lambda: (r := httpx.get(f"{web.url}/readyz")).status_code == 200 and r, 30)
    checks = ready.json()["checks"]
    assert set(checks) == {"database", "storage", "dimse", "processes", "rules"}
    assert checks["processes"]["detail"] == "2 of 2 processes up"  # main and HTTP
    # Each probe connected to the DICOM port and left without a byte: no log line each.
    assert "before association" not in web.node.log()

    rules.write_text(
        "rules:\n  - name: broken\n    match: {NoSuchKeyword: 1}\n    pipelines: [echo]\n"
    )
    broken = httpx.get(f"{web.url}/readyz")
    assert broken.status_code == 503
    checks = broken.json()["checks"]
    assert checks["rules"]["ok"] is False and "NoSuchKeyword" in checks["rules"]["detail"]
    assert checks["database"]["ok"] and checks["dimse"]["ok"] and checks["storage"]["ok"]


def test_the_audit_trail_records_who_did_what(start_web_node, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    web = start_web_node(workers={"count": 0}, routing={"rules_file": str(rules)})
    ds = ct_dataset(generate_uid())
    assert post(web, body(part10(ds))).status_code == 200
    job = wait_until(lambda: (api(web, "GET", "/jobs", "viewer").json() or [None])[0], 30)
    assert api(web, "POST", f"/jobs/{job['id']}/cancel").status_code == 200
    assert web.node.cli("jobs", "retry", str(job["id"])).returncode == 0
    missing = web.node.cli("jobs", "retry", "9999")  # the CLI and the API share one service
    assert missing.returncode == 1 and "no job 9999" in missing.stderr

    fetched = api(web, "POST", "/fetches", json={"source": "modality", "study": "1.2.3"})
    assert fetched.status_code == 202

    assert api(web, "GET", "/audit", "viewer").status_code == 403  # administrators only
    events = api(web, "GET", "/audit").json()
    received = next(e for e in reversed(events) if e["kind"] == "received")
    assert received["actor"] == "modality-web"
    assert received["study_instance_uid"] == ds.StudyInstanceUID
    assert received["detail"]["instances"] == 1 and received["detail"]["source"] == "dicomweb"
    cancel = next(e for e in events if e["detail"].get("action") == "cancel job")
    assert cancel["actor"] == "it-admin"
    assert (cancel["detail"]["before"], cancel["detail"]["after"]) == ("queued", "cancelled")
    retry = next(e for e in events if e["detail"].get("action") == "retry job")
    assert retry["actor"].startswith("cli:")
    assert (retry["detail"]["before"], retry["detail"]["after"]) == ("cancelled", "queued")
    queued = next(e for e in events if e["detail"].get("action") == "queue fetch")
    assert queued["actor"] == "it-admin" and queued["detail"]["id"] == fetched.json()["id"]
    listed = web.node.cli("audit", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    actions = [e["detail"].get("action") for e in json.loads(listed.stdout)]
    assert actions[:3] == ["queue fetch", "retry job", "cancel job"]
    assert "Test^Phantom" not in listed.stdout  # the study UID leads to the patient, not names


def test_series_and_studies_page_newest_first(web_node: WebNode) -> None:
    sent = []
    for _ in range(3):
        ds = ct_dataset(generate_uid())
        assert post(web_node, body(part10(ds))).status_code == 200
        sent.append(str(ds.SeriesInstanceUID))
    listed = [s["series_instance_uid"] for s in api(web_node, "GET", "/series", "viewer").json()]
    assert listed == sent  # oldest first, all of them
    newest = api(web_node, "GET", "/series?limit=2&newest=true", "viewer").json()
    assert [s["series_instance_uid"] for s in newest] == sent[:0:-1]
    (study,) = api(web_node, "GET", "/studies?limit=1&newest=true", "viewer").json()
    assert study["study_instance_uid"] == newest[0]["study_instance_uid"]
    assert api(web_node, "GET", "/series?limit=0", "viewer").status_code == 422


def test_head_answers_as_get_without_the_body(web_node: WebNode) -> None:
    """Monitors and proxies probe with HEAD: the same status and headers as GET, no body,
    the same refusal without a token."""
    ds = ct_dataset(generate_uid())
    assert post(web_node, body(part10(ds))).status_code == 200
    instance = (
        f"{web_node.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    reader = {**web_node.auth("viewer"), "Accept": "multipart/related; type=application/dicom"}
    for url, headers in [
        (f"{web_node.url}/", {}),
        (f"{web_node.url}/healthz", {}),
        (instance, reader),
        (instance, {}),
    ]:
        got = httpx.get(url, headers=headers)
        head = httpx.head(url, headers=headers)
        assert head.status_code == got.status_code != 405, url
        assert head.content == b""
        kind = [head.headers.get("content-type", ""), got.headers.get("content-type", "")]
        assert [k.split("boundary=")[0] for k in kind] == [kind[1].split("boundary=")[0]] * 2
        assert head.headers.get("content-length") == got.headers.get("content-length"), url
    assert httpx.head(instance).status_code == 401
    assert f"HEAD /dicom-web/studies/{ds.StudyInstanceUID}" in web_node.node.log()


def test_patient_identifiers_go_to_the_phi_role_only_and_each_view_is_audited(
    web_node: WebNode,
) -> None:
    ds = ct_dataset(generate_uid())
    ds.PatientID, ds.AccessionNumber, ds.StudyDate = "PID-7", "ACC-42", "20261206"
    assert post(web_node, body(part10(ds))).status_code == 200
    patient = {
        "patient_name": "Test^Phantom",
        "patient_id": "PID-7",
        "accession_number": "ACC-42",
        "study_date": "20261206",
    }

    def study(who: str, path: str) -> dict:
        answer = api(web_node, "GET", path, who).json()
        found = answer["studies"] if path == "/status" else answer
        (only,) = [s for s in found if s["study_instance_uid"] == ds.StudyInstanceUID]
        return {key: only[key] for key in patient}

    for path in ("/status", "/studies"):
        assert study("viewer", path) == dict.fromkeys(patient)  # a reader: UIDs only
        assert study("records-clerk", path) == patient
        assert study("it-admin", path) == patient
        assert study("it-admin", path) == patient  # again within the minute: one event
    # finding a study by patient: the phi role only
    (found,) = api(web_node, "GET", "/studies?find=ACC-42", "records-clerk").json()
    assert found["study_instance_uid"] == ds.StudyInstanceUID
    assert api(web_node, "GET", "/studies?find=PID-7", "it-admin").json()[0] == found
    assert api(web_node, "GET", "/studies?find=nobody", "it-admin").json() == []
    assert api(web_node, "GET", "/studies?find=PID-7", "viewer").status_code == 403
    assert api(web_node, "GET", "/studies?find=" + "x" * 65, "it-admin").status_code == 422
    assert "PID-7" not in web_node.node.log()  # the query string is never logged
    events = [e for e in api(web_node, "GET", "/audit").json() if e["kind"] == "patient record"]
    assert sorted((e["actor"], e["detail"]["route"]) for e in events) == [
        ("it-admin", "/api/v1/status"),
        ("it-admin", "/api/v1/studies"),
        ("it-admin", "/api/v1/studies?find"),  # one a search that found a study
        ("records-clerk", "/api/v1/status"),
        ("records-clerk", "/api/v1/studies"),
        ("records-clerk", "/api/v1/studies?find"),
    ]
    assert all(e["detail"]["studies"] == 1 for e in events)
    assert not any("PID-7" in json.dumps(e) or "ACC-42" in json.dumps(e) for e in events)
    whoami = api(web_node, "GET", "/whoami", "records-clerk").json()
    assert whoami["roles"] == ["phi", "reader"]
