"""The HTTP door attacked as a hospital's security review would: malformed, oversized and
hostile requests each get a 4xx with one log line, never a 500, a traceback, a query value
in the log or a forged log line."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from node.ops.logs import escaped
from tests.node.edge.test_scp import ct_dataset
from tests.node.web.conftest import WebNode, trickled_until_closed, web_starter
from tests.node.web.test_stow import CONTENT_TYPE, body, part10, post
from tests.peers import wait_until


@pytest.fixture
def stored(shared_web_node: WebNode) -> pydicom.Dataset:
    ds = ct_dataset(generate_uid())
    assert post(shared_web_node, body(part10(ds))).status_code == 200
    return ds


def instance_url(web: WebNode, ds: pydicom.Dataset) -> str:
    return (
        f"{web.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def test_a_frame_list_is_bounded_and_deduplicated(shared_web_node: WebNode, stored) -> None:
    reader = shared_web_node.auth("viewer")
    url = instance_url(shared_web_node, stored)
    amplified = httpx.get(f"{url}/frames/{','.join(['1'] * 9000)}", headers=reader)
    assert amplified.status_code == 400
    assert "at most" in amplified.json()["detail"]
    repeated = httpx.get(f"{url}/frames/1,1,1", headers=reader)
    assert repeated.status_code == 200
    assert repeated.content.count(b"Content-Type: application/octet-stream") == 1
    for bad in ("0", "2", "1,x", "-1", "9" * 40):
        assert httpx.get(f"{url}/frames/{bad}", headers=reader).status_code in (400, 404), bad
    assert "Traceback" not in shared_web_node.node.log()


def test_qido_bounds_its_criteria_and_never_logs_their_values(shared_web_node: WebNode) -> None:
    reader = shared_web_node.auth("viewer")
    url = f"{shared_web_node.dicomweb}/studies"
    many = "&".join(["PatientID=SECRET-PID-4711"] * 1000)
    flooded = httpx.get(f"{url}?{many}", headers=reader)
    assert flooded.status_code == 400
    uids = ",".join(f"1.2.{n}" for n in range(1200))
    assert httpx.get(f"{url}?StudyInstanceUID={uids}", headers=reader).status_code == 400
    for query in (
        "offset=9223372036854775808",
        "limit=-1",
        "StudyDate=2024-13-45",
        "StudyDate=yesterday",
    ):
        found = httpx.get(f"{url}?{query}", headers=reader)
        assert found.status_code == 400, (query, found.status_code, found.text)
    assert httpx.get(f"{url}?StudyDate=20240101-20241231", headers=reader).status_code == 200
    huge = httpx.get(f"{shared_web_node.dicomweb}/series?SeriesNumber={'9' * 20}", headers=reader)
    assert huge.status_code == 400
    log = shared_web_node.node.log()
    assert "SECRET-PID-4711" not in log
    assert "Traceback" not in log


def test_out_of_range_numbers_and_tags_are_4xx(shared_web_node: WebNode, stored) -> None:
    admin = shared_web_node.auth("it-admin")
    api = f"{shared_web_node.url}/api/v1"
    for path in ("jobs/99999999999999999999/retry", "jobs/0/cancel", "dispatches/-5/retry"):
        assert httpx.post(f"{api}/{path}", headers=admin).status_code == 422, path
    assert httpx.get(f"{api}/series?limit=99999999999999999999", headers=admin).status_code == 422
    url = instance_url(shared_web_node, stored)
    reader = shared_web_node.auth("viewer")
    for tag in ("ffffffffff", "zz", "7fe0001"):
        assert httpx.get(f"{url}/bulkdata/{tag}", headers=reader).status_code == 400, tag
    assert "Traceback" not in shared_web_node.node.log()


def test_no_peer_string_forges_a_log_line(start_web_node, jwks_file, signing_key) -> None:
    """A JWT whose user name holds a newline and a made-up log line: the node logs the name
    escaped, on its own line."""
    from tests.node.web.test_auth import AUDIENCE, ISSUER, token

    jwt = {
        "jwks_file": str(jwks_file),
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "roles_claim": "realm_access.roles",
    }
    web = start_web_node(auth={"jwt": jwt}, workers={"count": 0})
    forged = "2026-01-01 00:00:00,000 CRITICAL MainProcess node: FORGED"
    bearer = token(
        signing_key, preferred_username=f"dr.x\n{forged}", realm_access={"roles": ["sender"]}
    )
    answer = httpx.post(
        f"{web.dicomweb}/studies",
        content=body(part10(ct_dataset(generate_uid()))),
        headers={"Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {bearer}"},
    )
    assert answer.status_code == 200
    wait_until(lambda: "from dr.x" in web.node.log(), 10)
    lines = web.node.log().splitlines()
    assert not any(line.startswith(forged[:19]) for line in lines)
    assert any(f"from dr.x\\n{forged}" in line for line in lines)


def test_log_messages_are_one_line() -> None:
    assert escaped("AE\r\nFAKE\x1b[31m\u2028") == "AE\\r\\nFAKE\\x1b[31m\\u2028"
    assert escaped("Müller^Jörg 1.2.3") == "Müller^Jörg 1.2.3"


def test_a_stow_client_gone_mid_body_costs_one_line(shared_web_node: WebNode) -> None:
    """A sender that disconnects inside its body: what it sent whole is kept, the rest is
    not, and the log says so in one line, without a traceback."""
    whole, cut_off = ct_dataset(generate_uid()), ct_dataset(generate_uid())
    content = body(part10(whole), part10(cut_off))
    cut = content[: len(content) - 200]
    storage = shared_web_node.node.storage
    host, port = shared_web_node.url.removeprefix("http://").split(":")
    request = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(content)}\r\n"
        f"Authorization: {shared_web_node.auth('modality-web')['Authorization']}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(request + cut)
        wait_until(lambda: list((storage / whole.StudyInstanceUID).rglob("*.dcm")), 20)
    wait_until(lambda: "went away mid-request" in shared_web_node.node.log(), 20)
    assert "Traceback" not in shared_web_node.node.log()
    assert len(list((storage / whole.StudyInstanceUID).rglob("*.dcm"))) == 1
    assert not (storage / cut_off.StudyInstanceUID).exists()
    assert list((storage / ".incoming").iterdir()) == []


def test_a_host_that_is_not_the_node_is_refused(shared_web_node: WebNode, stored) -> None:
    """DNS rebinding: a page of evil.example whose name resolves to the node reads nothing."""
    url = f"{shared_web_node.dicomweb}/studies"
    reader = shared_web_node.auth("viewer")
    rebound = httpx.get(url, headers={**reader, "Host": "evil.example"})
    assert rebound.status_code == 400
    assert stored.StudyInstanceUID not in rebound.text
    port = shared_web_node.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1"):
        assert httpx.get(url, headers={**reader, "Host": host}).status_code == 200, host
    assert "Host 'evil.example' is not this node" in shared_web_node.node.log()


def test_every_answer_carries_the_security_headers(shared_web_node: WebNode, stored) -> None:
    reader = shared_web_node.auth("viewer")
    answers = {
        "qido": httpx.get(f"{shared_web_node.dicomweb}/studies", headers=reader),
        "wado": httpx.get(f"{instance_url(shared_web_node, stored)}/metadata", headers=reader),
        "api": httpx.get(f"{shared_web_node.url}/api/v1/series", headers=reader),
        "missing": httpx.get(f"{shared_web_node.dicomweb}/studies/1.2.3/metadata", headers=reader),
        "refused": httpx.get(f"{shared_web_node.dicomweb}/studies"),
        "health": httpx.get(f"{shared_web_node.url}/healthz"),
    }
    for name, answer in answers.items():
        assert answer.headers["X-Content-Type-Options"] == "nosniff", name
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"], name
    for name in ("qido", "wado", "api", "missing"):
        assert answers[name].headers["Cache-Control"] == "no-store", name


def test_the_api_docs_work_offline_and_need_a_token(shared_web_node: WebNode) -> None:
    page = httpx.get(f"{shared_web_node.url}/api/docs")
    assert page.status_code == 200
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "docs.js"):
        assert httpx.get(f"{shared_web_node.url}/api/docs/assets/{asset}").status_code == 200, asset
    assert httpx.get(f"{shared_web_node.url}/api/docs/assets/../../config.yaml").status_code == 404
    schema = f"{shared_web_node.url}/api/openapi.json"
    assert httpx.get(schema).status_code == 401
    described = httpx.get(schema, headers=shared_web_node.auth("viewer"))
    assert (
        described.status_code == 200 and "/api/v1/jobs/{job_id}/retry" in described.json()["paths"]
    )


def test_cors_lets_only_the_configured_origins_in(start_web_node) -> None:
    viewer = "https://viewer.hospital.example"
    web = start_web_node(http_extra={"cors_origins": [viewer]}, workers={"count": 0})
    preflight = {"Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}  # fmt: skip
    url = f"{web.dicomweb}/studies"
    allowed = httpx.options(url, headers={"Origin": viewer, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == viewer
    assert "authorization" in allowed.headers["Access-Control-Allow-Headers"].lower()
    other = httpx.options(url, headers={"Origin": "https://evil.example", **preflight})
    assert "Access-Control-Allow-Origin" not in other.headers
    answer = httpx.get(url, headers={"Origin": viewer, **web.auth("viewer")})
    assert answer.headers["Access-Control-Allow-Origin"] == viewer


def raw_connection(web: WebNode) -> socket.socket:
    host, port = web.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=20)


def status_of(sock: socket.socket) -> int | None:
    """The status code the node answered before closing, or None if it just closed."""
    answer = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(4096):
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


@pytest.fixture(scope="module")
def module_strict_web(start_module_node) -> WebNode:
    limits = {"max_header_kb": 16, "header_timeout_seconds": 1, "body_idle_seconds": 1,
              "max_connections": 20}  # fmt: skip
    return web_starter(start_module_node)(
        http_extra=limits,
        node={"min_transfer_kbps": 1},
        completion={"quiet_seconds": 1, "release_grace_seconds": 0.5},
        workers={"count": 0},
    )


@pytest.fixture
def strict_web(module_strict_web: WebNode) -> WebNode:
    """A node with tight HTTP limits, shared by the module's tests, its log read from this
    test's start."""
    module_strict_web.node.mark_log()
    return module_strict_web


def test_a_header_flood_gets_431_and_costs_no_memory(strict_web: WebNode) -> None:
    with raw_connection(strict_web) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
        with contextlib.suppress(OSError):
            for _ in range(64):  # 4 MiB, never terminated
                sock.sendall(b"a" * 65536)
        assert status_of(sock) == 431
    assert httpx.get(f"{strict_web.url}/healthz").status_code == 200


def test_a_slowloris_head_gets_408_and_the_connection_back(strict_web: WebNode) -> None:
    """Half-sent heads hold no connection past http.header_timeout_seconds; past
    http.max_connections a new one gets 503, and both are logged."""
    idle = [raw_connection(strict_web) for _ in range(25)]
    for sock in idle:
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\n")
    statuses = [status_of(sock) for sock in idle]
    for sock in idle:
        sock.close()
    assert statuses.count(408) == 20 and statuses.count(503) == 5, statuses
    assert httpx.get(f"{strict_web.url}/healthz").status_code == 200
    log = strict_web.node.log()
    assert "request head not whole within 1 s" in log
    assert "open connections at http.max_connections" in log


def test_a_trickling_stow_is_cut_and_its_series_completes(strict_web: WebNode) -> None:
    """Finding 10: one whole instance, then a byte every 0.3 s: the body falls below
    node.min_transfer_kbps, the connection is closed, and the series that the first instance
    opened completes."""
    first = ct_dataset(generate_uid())
    content = body(part10(first), part10(ct_dataset(generate_uid(), first.StudyInstanceUID)))
    second = content.index(b"--a1b2c3", 10)
    head = content[: content.index(b"\r\n", second) + 2]  # the first part and its end
    with raw_connection(strict_web) as sock:
        sock.sendall(
            b"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(content)}\r\n".encode()
            + f"Authorization: {strict_web.auth('modality-web')['Authorization']}\r\n\r\n".encode()
            + head
        )
        closed = trickled_until_closed(sock, content[len(head) : len(head) + 60])
        assert closed, "the node kept reading a body that trickled"
    uid = str(first.SeriesInstanceUID)
    series = wait_until(
        lambda: strict_web.node.series().get(uid, {}).get("state") == "complete", 20
    )
    assert series
    assert "below node.min_transfer_kbps" in strict_web.node.log()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_stow_memory_does_not_grow_with_the_body(start_web_node) -> None:
    """Finding 9: parts are spooled to disk and copied into place by the kernel: a 256 MiB
    body of two 128 MiB instances moves the HTTP process's peak RSS by far less than a part."""
    web_node = start_web_node(workers={"count": 0})
    processes = wait_until(
        lambda: {p["name"]: p["pid"] for p in web_node.node.status()["processes"]}, 10
    )
    http_pid = processes["http"]
    assert post(web_node, body(part10(ct_dataset(generate_uid())))).status_code == 200
    before = peak_rss_mb(http_pid)
    big = []
    for _ in range(2):
        ds = ct_dataset(generate_uid())
        ds.Rows = ds.Columns = 8192
        ds.PixelData = b"\1\0" * (8192 * 8192)
        big.append(part10(ds))
    answer = httpx.post(
        f"{web_node.dicomweb}/studies",
        content=body(*big),
        headers={"Content-Type": CONTENT_TYPE, **web_node.auth("modality-web")},
        timeout=300,
    )
    assert answer.status_code == 200, answer.text
    grown = peak_rss_mb(http_pid) - before
    assert grown < 64, f"peak RSS grew {grown:.0f} MiB for a 256 MiB body"
    stored = sorted(web_node.node.storage.rglob("*.dcm"), key=lambda p: p.stat().st_size)
    assert stored[-1].stat().st_size > 128 << 20


def stow_a_study(web: WebNode, instances: int) -> None:
    """One STOW-RS request of a study of `instances` small CT instances; a request the node
    cuts off (it is being killed) is no error here."""
    study = generate_uid()
    parts = [part10(ct_dataset(generate_uid(), study)) for _ in range(instances)]
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(
            f"{web.dicomweb}/studies",
            content=body(*parts),
            headers={"Content-Type": CONTENT_TYPE, **web.auth("modality-web")},
            timeout=60,
        )


def http_processes(web: WebNode) -> dict[str, int]:
    """The PID of each HTTP process the node's process table lists as ready."""
    listed = web.node.status()["processes"]
    return {p["name"]: p["pid"] for p in listed if p["name"].startswith("http") and p["ready"]}


def test_http_processes_share_the_port_and_one_frozen_or_killed_stops_no_one(
    start_web_node,
) -> None:
    """`http.processes: 2`: with one process frozen (SIGSTOP: it accepts nothing), the other
    answers every request; one killed is restarted under its name."""
    import os
    import signal

    web = start_web_node(workers={"count": 0}, http_extra={"processes": 2})
    first = wait_until(lambda: len(found := http_processes(web)) == 2 and found, 30)
    assert set(first) == {"http", "http-1"}
    os.kill(first["http"], signal.SIGSTOP)
    try:
        with httpx.Client(timeout=20) as client:
            answers = [client.get(f"{web.url}/healthz").status_code for _ in range(20)]
    finally:
        os.kill(first["http"], signal.SIGCONT)
    assert answers == [200] * 20
    os.kill(first["http-1"], signal.SIGKILL)
    restarted = wait_until(
        lambda: (
            (found := http_processes(web)).get("http-1") not in (None, first["http-1"]) and found
        ),
        60,
    )
    assert restarted["http"] == first["http"]
    assert f"http-1 process {first['http-1']} exited with -9" in web.node.log()
    assert httpx.get(f"{web.dicomweb}/studies", headers=web.auth("viewer")).status_code == 200


@pytest.mark.slow
def test_an_http_process_killed_mid_stow_leaves_no_orphan(start_web_node) -> None:
    """Finding 15: SIGKILL the HTTP process while a STOW-RS request streams in, then stop the
    node at once (before the crash check's delay): every file in the store has its row, and
    nothing is left in the spool folder."""
    web_node = start_web_node(workers={"count": 0})
    import os
    import signal
    import sqlite3
    import threading

    processes = wait_until(
        lambda: {p["name"]: p["pid"] for p in web_node.node.status()["processes"]}, 10
    )
    sender = threading.Thread(target=stow_a_study, args=(web_node, 400))
    sender.start()
    wait_until(lambda: list(web_node.node.storage.rglob("*.dcm")), 20)
    os.kill(processes["http"], signal.SIGKILL)
    sender.join()
    wait_until(lambda: "http process" in web_node.node.log(), 10)
    wait_until(  # its successor serves before the node is stopped
        lambda: httpx.get(f"{web_node.url}/healthz").status_code == 200,
        60,
        retry_on=(httpx.HTTPError,),
    )
    assert web_node.node.stop() == 0
    files = {p.stem for p in web_node.node.storage.rglob("*.dcm")}
    database = web_node.node.settings["database"]["url"].removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(database)) as conn:
        rows = {uid for (uid,) in conn.execute("SELECT sop_instance_uid FROM instances")}
    assert files == rows
    assert list((web_node.node.storage / ".incoming").iterdir()) == []


@pytest.mark.slow
def test_the_children_of_a_killed_main_process_stop_quietly(start_web_node, tmp_path: Path) -> None:
    """Finding 15: SIGKILL the main process while STOW-RS and C-STORE stream in and a worker
    runs: every child (receivers, worker, HTTP) logs that its parent is gone and stops, and
    none prints a traceback on its way out (seen: `dictionary changed size during iteration`
    from an atexit callback, with the child's threads still running)."""
    import os
    import signal
    import threading

    from tests.peers import storescu
    from tests.phantoms import chest, chest_geometry, write_series

    web = start_web_node(node={"receivers": 2}, workers={"count": 1})
    children = wait_until(lambda: len(web.node.children()) >= 4 and web.node.children(), 30)
    files = write_series(tmp_path / "ct", chest_geometry(), chest())
    senders = [threading.Thread(target=stow_a_study, args=(web, 300))]
    senders += [
        threading.Thread(target=storescu, args=(web.node.port, files), kwargs={"check": False})
    ]
    for sender in senders:
        sender.start()
    wait_until(lambda: len(list(web.node.storage.rglob("*.dcm"))) > 20, 30)
    assert web.node.proc is not None
    os.kill(web.node.proc.pid, signal.SIGKILL)
    web.node.proc.wait()
    for sender in senders:
        sender.join()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 60)
    log = web.node.log()
    for child in ("receiver-1", "worker-0", "http"):
        assert f"{child} node.ops.lifecycle: parent process" in log, log[-3000:]
    assert "Traceback" not in log and "Exception ignored" not in log, log[-3000:]


def test_clients_get_what_they_ask_for_or_406(shared_web_node: WebNode, tmp_path: Path) -> None:
    """Finding 17: frames as stored when the stored image type is asked for, decoded when
    octet-stream is, 406 for what cannot be served; QIDO answers DICOM JSON or 406."""
    from tests.node.web.test_qido_wado import jpeg_baseline_ct

    ds = jpeg_baseline_ct(tmp_path)
    assert post(shared_web_node, body(part10(ds))).status_code == 200
    reader = shared_web_node.auth("viewer")
    url = f"{instance_url(shared_web_node, ds)}/frames/1"
    jpeg = httpx.get(url, headers={**reader, "Accept": 'multipart/related; type="image/jpeg"'})
    assert jpeg.status_code == 200
    assert 'type="image/jpeg"' in jpeg.headers["content-type"]
    assert b"\xff\xd8" in jpeg.content and b"transfer-syntax=1.2.840.10008.1.2.4.50" in jpeg.content
    native = httpx.get(url, headers=reader)
    assert (
        native.status_code == 200 and "application/octet-stream" in native.headers["content-type"]
    )
    for refused in ('multipart/related; type="image/jls"', "image/png"):
        assert httpx.get(url, headers={**reader, "Accept": refused}).status_code == 406, refused
    qido = f"{shared_web_node.dicomweb}/studies"
    assert httpx.get(qido, headers={**reader, "Accept": "application/dicom+xml"}).status_code == 406
    assert httpx.get(qido, headers={**reader, "Accept": "application/json"}).status_code == 200


def test_conditional_and_compressed_answers_and_capabilities(
    shared_web_node: WebNode, stored
) -> None:
    """Finding 20: ETag and Last-Modified on retrievals (304 when unchanged), gzip for JSON,
    and OPTIONS /dicom-web describing the service."""
    reader = shared_web_node.auth("viewer")
    url = f"{instance_url(shared_web_node, stored)}/metadata"
    first = httpx.get(url, headers=reader)
    etag = first.headers["ETag"]
    assert first.headers["Last-Modified"]
    again = httpx.get(url, headers={**reader, "If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    instance = httpx.get(instance_url(shared_web_node, stored), headers=reader)
    assert instance.headers["ETag"] != etag  # another representation, another tag
    for _ in range(40):
        post(shared_web_node, body(part10(ct_dataset(generate_uid(), stored.StudyInstanceUID))))
    metadata = httpx.get(
        f"{shared_web_node.dicomweb}/studies/{stored.StudyInstanceUID}/metadata",
        headers={**reader, "Accept-Encoding": "gzip"},
    )
    assert metadata.headers["Content-Encoding"] == "gzip"
    assert len(metadata.json()) == 41
    described = httpx.options(shared_web_node.dicomweb)
    assert described.status_code == 200 and "GET" in described.headers["Allow"]
    assert "/studies/{study}/metadata" in described.json()["resources"]


def test_qido_says_what_it_cannot_do_and_answers_the_image_size(
    shared_web_node: WebNode, stored
) -> None:
    """Finding 18: instance level answers Rows, Columns, BitsAllocated, NumberOfFrames (when
    present) and InstanceAvailability; includefield beyond what the node keeps and
    fuzzymatching=true get a Warning instead of silence."""
    reader = shared_web_node.auth("viewer")
    url = f"{shared_web_node.dicomweb}/studies/{stored.StudyInstanceUID}/instances"
    (found,) = httpx.get(url, headers=reader).json()
    instance = pydicom.Dataset.from_json(found)
    assert (instance.Rows, instance.Columns, instance.BitsAllocated) == (2, 2, 16)
    assert "NumberOfFrames" not in instance  # the phantom has none
    assert instance.InstanceAvailability == "ONLINE"
    warned = httpx.get(
        f"{url}?includefield=Rows,PatientAge&includefield=00101010&fuzzymatching=true",
        headers=reader,
    )
    warning = warned.headers["Warning"]
    assert "PatientAge" in warning and "00101010" in warning and "Rows" not in warning
    assert "fuzzymatching is not supported" in warning
    assert "Warning" not in httpx.get(f"{url}?includefield=all", headers=reader).headers


def test_rendered_images_and_thumbnails(shared_web_node: WebNode, real_series) -> None:
    """Finding 20: a real CT slice rendered as JPEG in its own window, as PNG in a lung
    window, scaled into a viewport; thumbnails of the study, series and instance; bad
    parameters 400, unservable types 406."""
    import io

    from PIL import Image

    from tests.peers import storescu

    files = real_series["covid"][:3]
    storescu(shared_web_node.node.port, files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    reader = shared_web_node.auth("viewer")
    url = instance_url(shared_web_node, first)
    jpeg = httpx.get(f"{url}/rendered", headers=reader)
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(jpeg.content))
    assert picture.size == (first.Columns, first.Rows)
    assert sum(picture.getextrema()) > 0 and picture.getextrema()[1] > 128  # not blank
    lung = httpx.get(
        f"{url}/frames/1/rendered?window=-600,1500&viewport=256,256",
        headers={**reader, "Accept": "image/png"},
    )
    assert lung.status_code == 200 and lung.headers["content-type"] == "image/png"
    assert max(Image.open(io.BytesIO(lung.content)).size) == 256
    study = f"{shared_web_node.dicomweb}/studies/{first.StudyInstanceUID}"
    for thumb in (f"{study}/thumbnail", f"{study}/series/{first.SeriesInstanceUID}/thumbnail",
                  f"{url}/thumbnail"):  # fmt: skip
        answer = httpx.get(thumb, headers=reader)
        assert answer.status_code == 200, thumb
        assert max(Image.open(io.BytesIO(answer.content)).size) == 128
    for query in ("window=abc", "window=40,-5", "viewport=99999,1", "quality=0"):
        assert httpx.get(f"{url}/rendered?{query}", headers=reader).status_code in (400, 422)
    assert httpx.get(f"{url}/frames/2/rendered", headers=reader).status_code == 404
    refused = httpx.get(f"{url}/rendered", headers={**reader, "Accept": "image/gif"})
    assert refused.status_code == 406
    assert httpx.get(f"{url}/rendered").status_code == 401
