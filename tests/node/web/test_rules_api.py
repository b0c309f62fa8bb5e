"""Administering a real node over HTTP: the rules checked, explained with a proposed text,
replaced atomically with the old file kept, reloaded; a series routed again; the processes
and what the workers run."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from pydicom.uid import generate_uid

from tests.node.edge.test_scp import ct_dataset
from tests.node.web.conftest import WebNode
from tests.node.web.test_api import RULES, api
from tests.node.web.test_stow import body, part10, post
from tests.peers import wait_until

TWO_PIPELINES = RULES + "  - name: quant\n    match: {Modality: CT}\n    pipelines: [lung-quant]\n"
BROKEN = "rules:\n  - name: bad\n    match: {Modality: CT}\n    pipelines: [no-such-pipeline]\n"
YAML = {"Content-Type": "application/yaml"}


def send_one_series(web: WebNode) -> str:
    ds = ct_dataset(generate_uid())
    assert post(web, body(part10(ds))).status_code == 200
    return str(ds.SeriesInstanceUID)


def pipelines_of_jobs(web: WebNode) -> list[str]:
    return sorted(job["pipeline"] for job in api(web, "GET", "/jobs", "viewer").json())


def test_rules_checked_explained_replaced_and_a_series_routed_again(
    start_web_node, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    web = start_web_node(
        workers={"count": 0},
        routing={"rules_file": str(rules)},
        completion={"quiet_seconds": 1, "release_grace_seconds": 0.2},
    )
    series = send_one_series(web)
    assert wait_until(lambda: pipelines_of_jobs(web) == ["echo"], 30)

    current = api(web, "GET", "/rules", "viewer").json()
    assert current["text"] == RULES and current["status"]["rules"] == 1
    assert api(web, "POST", "/rules/check", "viewer", content=RULES).status_code == 403

    checked = api(web, "POST", "/rules/check", content=BROKEN, headers=YAML).json()
    assert checked["valid"] is False
    (problem,) = checked["problems"]
    assert (problem["file"], problem["line"]) == (f"{rules} (proposed)", 4)  # not the file
    assert "no-such-pipeline" in problem["message"]
    assert api(web, "POST", "/rules/check").json() == {
        "file": str(rules),
        "valid": True,
        "rules": 1,
        "problems": [],
    }

    proposed = api(web, "POST", "/rules/explain", json={"series": series, "rules": TWO_PIPELINES})
    assert proposed.status_code == 200, proposed.text
    explained = proposed.json()
    assert [r["rule"] for r in explained["rules"] if r["matched"]] == ["ct", "quant"]
    assert [j["pipeline"] for j in explained["jobs"]] == ["echo", "lung-quant"]
    (modality,) = explained["rules"][0]["conditions"]
    assert modality["actual"] == "CT" and modality["matched"] is True
    now = api(web, "POST", "/rules/explain", json={"series": series}).json()
    assert [j["pipeline"] for j in now["jobs"]] == ["echo"]
    assert api(web, "POST", "/rules/explain", json={"series": "1.2.3"}).status_code == 404

    refused = api(web, "PUT", "/rules", content=BROKEN, headers=YAML)
    assert refused.status_code == 422
    assert refused.json()["detail"]["problems"][0]["line"] == 4
    assert rules.read_text() == RULES  # nothing changed

    replaced = api(web, "PUT", "/rules", content=TWO_PIPELINES, headers=YAML)
    assert replaced.status_code == 200, replaced.text
    backup = Path(replaced.json()["backup"])
    assert rules.read_text() == TWO_PIPELINES and backup.read_text() == RULES
    assert backup.parent == rules.parent

    # The series was routed by the old rules; routed again, it gains the new rule's job.
    assert api(web, "POST", f"/series/{series}/route", "viewer").status_code == 403
    assert api(web, "POST", "/series/1.2.3/route").status_code == 404
    assert api(web, "POST", f"/series/{series}/route").json()["state"] == "routing"
    try:
        wait_until(lambda: pipelines_of_jobs(web) == ["echo", "lung-quant"], 30)
    except TimeoutError:  # say what the node did (seen once in ~7 runs, not understood yet)
        jobs = api(web, "GET", "/jobs", "viewer").json()
        raise AssertionError(f"jobs: {jobs}\nlog:\n{web.node.log()[-4000:]}") from None

    reloaded = api(web, "POST", "/rules/reload")
    assert reloaded.status_code == 202 and reloaded.json()["rules"] == 2

    events = api(web, "GET", "/audit").json()
    actions = [e["detail"].get("action") for e in events if e["kind"] == "admin"]
    assert actions[:3] == ["reload rules", "route series", "replace rules"]
    change = next(e for e in events if e["detail"].get("action") == "replace rules")
    assert change["actor"] == "it-admin"
    assert (change["detail"]["before"], change["detail"]["after"]) == (RULES, TWO_PIPELINES)


def test_processes_and_the_job_each_worker_runs(start_web_node) -> None:
    web = start_web_node(workers={"count": 1}, node={"receivers": 2}, http_extra={"nice": 5})
    listed = wait_until(
        lambda: api(web, "GET", "/processes", "viewer").json(), 30, retry_on=(httpx.HTTPError,)
    )
    processes = {p["name"]: p for p in listed}  # recorded once every process has started
    assert set(processes) == {"main", "receiver-1", "worker-0", "http"}
    assert all(p["alive"] for p in processes.values())
    assert web.node.proc is not None and processes["main"]["pid"] == web.node.proc.pid
    # Ready once the worker has loaded its pipelines and the HTTP server serves, and only
    # then is "ready" logged.
    ready = wait_until(
        lambda: (c := httpx.get(f"{web.url}/readyz").json()["checks"]["processes"])["ok"] and c,
        60,
    )
    assert ready == {"ok": True, "detail": "4 of 4 processes up"}
    assert all(p["ready"] for p in api(web, "GET", "/processes", "viewer").json())
    log = wait_until(lambda: "node AINODE ready" in (text := web.node.log()) and text, 10)
    assert log.index("node AINODE ready") > log.index("Started server process")
    status = web.node.status()
    assert {p["name"] for p in status["processes"]} == set(processes)
    # the HTTP process yields the CPU to the receivers (http.nice: 5 here, off by default)
    niceness = {name: os.getpriority(os.PRIO_PROCESS, p["pid"]) for name, p in processes.items()}
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert niceness == {"main": base, "receiver-1": base, "worker-0": base, "http": base + 5}
