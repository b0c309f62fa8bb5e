"""Real peers for the tests: the node as a subprocess, DCMTK tools, a private PostgreSQL."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("AINODE_DATA", REPO.parent / "shared" / "data"))
"""The real CT (`../shared/data`, or where `AINODE_DATA` points: a GPU machine's copy)."""
REAL_SERIES = {
    "covid": DATA / "covid-ct-md" / "covid" / "P001",
    "cap": DATA / "covid-ct-md" / "cap" / "cap001",
    "normal": DATA / "covid-ct-md" / "normal" / "normal001",
    "lung-kernel": DATA / "lung-pet-ct-dx" / "A0001" / "series-2",
    "body-kernel": DATA / "lung-pet-ct-dx" / "A0001" / "series-3",
}
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool (the venv's pynetdicom ships a `storescu` of its own)."""
    path = shutil.which(tool, path="/usr/bin:/usr/local/bin")
    if path is None:
        import pytest

        pytest.skip(f"DCMTK {tool} is not installed")
    return path


def free_port() -> int:
    """A port free to listen on, below the kernel's ephemeral range: a port from that
    range (what `bind(0)` hands out) can meanwhile become the source port of any outgoing
    connection, and the node's bind then fails (seen in CI). Each xdist worker draws from
    a band of its own."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    low, band = 10000, 600
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    start = low + (worker * band) % max(first_ephemeral - low - band, band)
    for port in random.sample(range(start, start + band), band):
        if port in _DRAWN:  # drawn but maybe not bound yet: a node's second port, say
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _DRAWN.append(port)
            return port
    raise RuntimeError(f"no free port in {start}..{start + band}")


_DRAWN: deque[int] = deque(maxlen=100)
"""The ports this process drew last, not drawn again: two drawn before either is bound
(a node's DICOM and HTTP ports) could otherwise be one."""


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.05,
    retry_on: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds.
    An exception in `retry_on` (a server still starting) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except retry_on:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


@contextmanager
def storescp(port: int, output: Path | None = None, *tls: str) -> Iterator[subprocess.Popen[bytes]]:
    """DCMTK storescp as AE PACS on `port`, storing into `output` (default: its cwd)."""
    where = ()
    if output is not None:
        output.mkdir(exist_ok=True)
        where = ("-od", str(output))
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", *where, *tls, str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout=10)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait()


def storescu(
    port: int,
    paths: list[Path],
    calling_ae: str = "STORESCU",
    called_ae: str = "AINODE",
    check: bool = True,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu in one association, proposing their own syntaxes."""
    result = subprocess.run(
        [dcmtk("storescu"), "-v", "-aet", calling_ae, "-aec", called_ae, "-R", "-xs", *extra]
        + ["127.0.0.1", str(port)]
        + [str(p) for p in paths],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _serves_http(port: int, tls: bool) -> bool:
    """The node's HTTP process answers. The parent binds the port before its HTTP process
    has built the app, so an accepted connection alone is no sign it serves (seen on a
    loaded CI machine: the first request timed out)."""
    scheme = "https" if tls else "http"
    try:
        httpx.get(f"{scheme}://127.0.0.1:{port}/healthz", verify=False, timeout=5)
    except httpx.TransportError:
        return False
    return True


@dataclass
class NodeProcess:
    """`ainode serve` running as a real process on a private port and directory."""

    home: Path
    port: int
    settings: dict[str, Any]
    roles: tuple[str, ...] = ()
    """`serve --role` each (every role when empty)."""
    log_path: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = None
    log_start: int = 0
    """Where `log()` starts reading: `mark_log` moves it to the end (a shared node's next
    test reads only its own lines)."""

    def __post_init__(self) -> None:
        self.log_path = self.home / f"node{''.join(f'-{r}' for r in self.roles)}.log"

    @property
    def config_path(self) -> Path:
        return self.home / "config.yaml"

    @property
    def storage(self) -> Path:
        return Path(self.settings["storage"]["path"])

    def start(self) -> NodeProcess:
        self.launch()
        return self.wait_ready()

    def launch(self) -> NodeProcess:
        """Start the process without waiting for it to serve (several start together)."""
        self.config_path.write_text(yaml.safe_dump(self.settings))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "node", "serve", "--config", str(self.config_path)),
                    *(arg for role in self.roles for arg in ("--role", role)),
                ],
                cwd=self.home,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # as a service manager runs it: signals sent to the
                # test process's group (other tests' tools) do not reach it
            )
        return self

    def wait_ready(self) -> NodeProcess:
        wait_until(self._listening, timeout=60)
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
        if self.roles:
            from node.ops.processes import tree_health

            return tree_health(self.storage, self.roles, stale_seconds=10).serving
        ports = [self.port, self.settings.get("node", {}).get("tls_port")]
        http = self.settings.get("http") or {}
        return all(_accepts(port) for port in ports if port) and (
            not http.get("port") or _serves_http(http["port"], tls=bool(http.get("tls")))
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def children(self) -> list[int]:
        """PIDs of the node's child processes (receivers, workers), read from /proc."""
        assert self.proc is not None
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.proc.pid:
                pids.append(int(stat.parent.name))
        return pids

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self.log_start)
            return log.read().decode(errors="replace")

    def mark_log(self) -> None:
        """From now on, `log()` reads only the lines logged after this call."""
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def status(self) -> dict[str, Any]:
        """`ainode status --json`, parsed."""
        import json

        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def series(self) -> dict[str, dict[str, Any]]:
        """Series by UID, read straight from the database (fast enough to poll)."""
        from node.admin.report import build_report
        from node.store.db.engine import make_engine

        engine = make_engine(self.settings["database"]["url"])
        try:
            report = build_report(engine)
        finally:
            engine.dispose()
        return {s.series_instance_uid: s.model_dump() for s in report.series}


ECHO_TO_PACS = """
rules:
  - name: every-ct
    match: {Modality: CT}
    pipelines: [echo]
    destinations: [pacs]
"""
"""Routing rules: `echo` on every CT series, its SR to the peer named `pacs`."""


def node_settings(home: Path, port: int, database_url: str, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": port},
        "storage": {"path": str(home / "storage")},
        "database": {"url": database_url},
        "peers": {
            "modality": {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 104},
            "scu": {"ae_title": "TESTSCU", "host": "127.0.0.1", "port": 104},
        },
        "completion": {"quiet_seconds": 10, "release_grace_seconds": 1, "study_quiet_seconds": 3},
        "logging": {"level": "INFO"},
    }
    if "routing" not in overrides:  # no rules, no jobs: a worker would only load torch
        settings["workers"] = {"count": 0}
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(settings.get(section), dict):
            settings[section].update(values)
        else:
            settings[section] = values
    return settings


class PostgresServer:
    """A throwaway PostgreSQL cluster on loopback, run as the `postgres` user."""

    def __init__(self) -> None:
        # Its own directory under /tmp: pytest's temp dirs are closed to other users.
        self.root = Path(tempfile.mkdtemp(prefix="ainode-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self._as_postgres(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w", "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )  # fmt: skip
        return self

    def new_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


TOOLS = REPO.parent / "shared" / "tools"


class OrthancServer:
    """A private Orthanc (the PACS) via ../shared/tools/orthanc-up, knowing the node as a
    modality so it can send studies to it (`POST /modalities/AINODE/store`)."""

    def __init__(self, workdir: Path, node_port: int) -> None:
        self.workdir = workdir
        self.node_port = node_port
        self.env: dict[str, str] = {}

    @property
    def url(self) -> str:
        return self.env["ORTHANC_URL"]

    @property
    def dicomweb_url(self) -> str:
        return self.env["ORTHANC_DICOMWEB_URL"]

    @property
    def dicom_port(self) -> int:
        return int(self.env["ORTHANC_DICOM_PORT"])

    def start(self, ports: tuple[str, str] = ("auto", "auto")) -> OrthancServer:
        dicom, http = ports
        subprocess.run(
            [
                str(TOOLS / "orthanc-up"),
                "-p",
                dicom,
                "-H",
                http,
                "-a",
                "ORTHANC",
                "-m",
                f"AINODE@127.0.0.1:{self.node_port}",
                str(self.workdir),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        for line in (self.workdir / "orthanc.env").read_text().splitlines():
            key, _, value = line.partition("=")
            self.env[key] = value.strip("'\"")
        return self

    def stop(self) -> None:
        """Killed at once: its database is thrown away (a clean stop costs 2 s a test)."""
        subprocess.run(
            [str(TOOLS / "orthanc-down"), "--timeout", "0", str(self.workdir)],
            capture_output=True,
            timeout=120,
        )

    def get(self, path: str) -> Any:
        import json
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload: Any) -> Any:
        import json
        import urllib.request

        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(payload).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read() or b"null")
