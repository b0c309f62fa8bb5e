"""Shared fixtures: real data, the node as a process, PostgreSQL."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

# Set before anything loads torch (its OpenMP reads it once), and inherited by every node the
# tests start: the xdist workers and their nodes' processes share two cores, and OpenMP
# threads that spin while they wait take the cores from the others (the pipeline tests'
# fast tier, `-n 2`: 97-103 s spinning, 76 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from node.store.db.engine import make_engine
from node.store.db.migrate import upgrade
from tests.peers import (
    DATA,
    REAL_SERIES,
    NodeProcess,
    OrthancServer,
    PostgresServer,
    free_port,
    node_settings,
)


@pytest.fixture(scope="session")
def real_series() -> dict[str, list[Path]]:
    """The five real CT series of ../shared/data, as sorted file lists (skip when absent)."""
    if not all(path.is_dir() for path in REAL_SERIES.values()):
        pytest.skip(f"real data not found under {DATA}")
    return {name: sorted(path.glob("*.dcm")) for name, path in REAL_SERIES.items()}


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ainode.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated database on each backend."""
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


class NodeStarter:
    """Starts `ainode serve` processes in folders under `root`; `stop_all` stops them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[NodeProcess] = []

    def __call__(
        self, database_url: str | None = None, port: int | None = None, **overrides: Any
    ) -> NodeProcess:
        home = self.root / f"node{len(self.started)}"
        home.mkdir()
        url = database_url or f"sqlite:///{home / 'ainode.db'}"
        node = NodeProcess(home, port or free_port(), node_settings(home, 0, url, **overrides))
        node.settings["node"]["port"] = node.port
        self.started.append(node)
        for attempt in range(3):
            try:
                return node.start()
            except RuntimeError as exc:  # a port taken since it was drawn: draw again
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                node.port = node.settings["node"]["port"] = free_port()
                if node.settings.get("http"):
                    node.settings["http"]["port"] = free_port()
        raise AssertionError("unreachable")

    def stop_all(self) -> None:
        for node in self.started:
            if node.proc is not None and node.proc.poll() is None:
                node.stop()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start `ainode serve` processes; every one is stopped at teardown."""
    starter = NodeStarter(tmp_path)
    yield starter
    starter.stop_all()


@pytest.fixture(scope="module")
def start_module_node(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., NodeProcess]]:
    """Start nodes that a module's tests share (each test then works on UIDs of its own, and
    reads the log from its own start: `NodeProcess.mark_log`); stopped after the module."""
    starter = NodeStarter(tmp_path_factory.mktemp("shared"))
    yield starter
    starter.stop_all()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A private Orthanc that knows a node on `orthanc.node_port` as modality AINODE."""
    if shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists():
        pytest.skip("Orthanc is not installed")
    server = OrthancServer(tmp_path / "orthanc", free_port()).start()
    yield server
    server.stop()


@contextmanager
def serve_ohif(upstream: str, workdir: Path) -> Iterator[str]:
    """The OHIF viewer (../shared/tools/ohif-up) with `upstream` as its DICOMweb server;
    yields its URL (skips when chromium, nginx or the tools are missing)."""
    from tests.peers import TOOLS

    missing = [tool for tool in ("chromium", "nginx") if shutil.which(tool) is None]
    if missing or not (TOOLS / "ohif-up").exists():
        pytest.skip(f"viewer check needs {', '.join(missing) or 'shared/tools'}")
    cache = Path(os.environ.get("OHIF_CACHE", Path.home() / ".cache" / "ainode" / "ohif"))
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:  # test processes share the cache (pytest -n)
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = subprocess.run(
            [str(TOOLS / "ohif-up"), "-P", "auto", "--cache", str(cache), str(workdir), upstream],
            capture_output=True,
            text=True,
            timeout=300,
        )
    if started.returncode != 0:
        pytest.skip(f"OHIF could not be served: {started.stderr[-500:]}")
    env = dict(
        line.split("=", 1)
        for line in (workdir / "ohif.env").read_text().splitlines()
        if "=" in line
    )
    try:
        yield env["OHIF_URL"].strip("'\"")
    finally:
        subprocess.run([str(TOOLS / "ohif-down"), str(workdir)], capture_output=True, timeout=120)


@pytest.fixture
def ohif(orthanc, tmp_path: Path) -> Iterator[str]:
    """The OHIF viewer against `orthanc`; yields its URL."""
    with serve_ohif(orthanc.dicomweb_url, tmp_path / "ohif") as url:
        yield url


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fast tier runs in the test's own process: a test that starts the node as a process
    (the `start_node` fixture, also behind `start_web_node`) or lives under e2e/ is slow."""
    for item in items:
        uses = getattr(item, "fixturenames", ())
        if "start_node" in uses or "e2e" in item.path.parts:
            item.add_marker(pytest.mark.slow)
