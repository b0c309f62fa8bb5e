"""The admin socket: the running node answers its own CLI on this host (`ainode status`,
`jobs list`, `audit list`) as the database would, with no token and no TLS, to its own user
and root only; a socket left by a killed node is replaced, a live one is not taken over, and a
frozen HTTP process sends the CLI back to the database instead of hanging it."""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from node.admin.local import TIMEOUT_SECONDS
from node.web.admin_socket import bind_admin_socket
from tests.node.edge.test_scp import phantom_file
from tests.node.edge.test_tls import pki  # noqa: F401  (a fixture)
from tests.node.web.conftest import WebNode, web_starter
from tests.peers import NodeProcess, storescu, wait_until

RULES = "rules:\n  - name: ct\n    match: {Modality: CT}\n    pipelines: [echo]\n"
COMMANDS = [
    ("status",),
    ("status", "--json"),
    ("jobs", "list"),
    ("jobs", "list", "--state", "queued", "--json"),
    ("audit", "list"),
    ("audit", "list", "--since", "2000-01-01", "--json"),
]


def admin_socket(node: NodeProcess) -> Path:
    return node.storage / f".admin-{socket.gethostname()}.sock"


def config_variant(node: NodeProcess, name: str, **changes: dict) -> Path:
    """A copy of the node's config with some sections changed."""
    settings = dict(node.settings)
    for section, values in changes.items():
        settings[section] = {**settings.get(section, {}), **values}
    path = node.home / name
    path.write_text(yaml.safe_dump(settings))
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def answers(config: Path) -> dict[tuple[str, ...], str]:
    """Each read-only command's output."""
    found = {}
    for command in COMMANDS:
        result = cli(config, *command)
        assert result.returncode == 0, result.stderr
        found[command] = result.stdout
    return found


def without_disk(text: str) -> dict:
    report = json.loads(text)
    del report["disk"]  # free space moves between two reads
    return report


@pytest.fixture
def tls_web(start_web_node, pki: Path, tmp_path: Path) -> WebNode:  # noqa: F811
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return start_web_node(
        workers={"count": 0},  # the job stays queued
        routing={"rules_file": str(rules)},
        completion={"quiet_seconds": 1, "release_grace_seconds": 0.2},
        http_extra={"tls": {"cert_file": str(pki / "node.crt"), "key_file": str(pki / "node.key")}},
    )


def test_the_cli_reads_the_running_node_as_it_reads_the_database(
    tls_web: WebNode, tmp_path: Path
) -> None:
    node = tls_web.node
    storescu(node.port, [phantom_file(tmp_path)])
    wait_until(lambda: json.loads(node.cli("jobs", "list", "--json").stdout), timeout=30)
    path = admin_socket(node)
    assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == os.getuid()

    # no database to read: the answers can only come from the node, over its socket (the
    # HTTP port speaks TLS only, the socket plain HTTP)
    node_only = config_variant(node, "node-only.yaml", database={"url": "sqlite:////nowhere/x"})
    # no socket: the CLI reads the database itself
    database_only = config_variant(
        node, "database-only.yaml", http={"admin_socket": str(tmp_path / "none.sock")}
    )
    from_node = answers(node_only)
    from_database = answers(database_only)
    for command, text in from_node.items():
        if command == ("status", "--json"):
            assert without_disk(text) == without_disk(from_database[command])
        else:
            assert text == from_database[command], command
    assert "job " in from_node[("jobs", "list")] and "echo" in from_node[("jobs", "list")]
    status = json.loads(from_node[("status", "--json")])
    assert status["studies"][0]["patient_name"] == "Test^Phantom"  # an administrator's view

    # the view of patient identifiers through the node is audited, in the OS user's name
    user = pwd.getpwuid(os.getuid()).pw_name
    events = json.loads(cli(node_only, "audit", "list", "--json").stdout)
    assert any(e["actor"] == f"local:{user}" and e["kind"] == "patient record" for e in events)


@pytest.fixture(scope="module")
def open_folder() -> Iterator[Path]:
    """A folder anyone may enter (the default, the store, is the node's user's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="ainode-admin-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def socket_web_node(start_module_node, open_folder: Path) -> WebNode:
    socket_path = str(open_folder / "admin.sock")
    return web_starter(start_module_node)(
        workers={"count": 0}, http_extra={"admin_socket": socket_path}
    )


def as_nobody(path: Path) -> str:
    """The HTTP status another user gets on the socket (000: it could not connect)."""
    curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", str(path)]
    return subprocess.run(
        [*curl, "http://localhost/api/v1/audit"],
        user="nobody",
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_another_user_cannot_connect_and_is_refused_if_the_file_lets_it(
    socket_web_node: WebNode, open_folder: Path
) -> None:
    path = open_folder / "admin.sock"
    assert path.stat().st_mode & 0o777 == 0o600
    assert as_nobody(path) == "000"
    path.chmod(0o666)  # a mistake by hand: the peer check still holds
    try:
        assert as_nobody(path) == "403"
    finally:
        path.chmod(0o600)
    assert "admin socket: uid" in socket_web_node.node.log()


def test_a_frozen_http_process_sends_the_cli_to_the_database(socket_web_node: WebNode) -> None:
    node = socket_web_node.node
    http = http_pid(node)
    os.kill(http, signal.SIGSTOP)
    try:
        started = time.monotonic()
        listed = node.cli("jobs", "list", "--json")
        waited = time.monotonic() - started
    finally:
        os.kill(http, signal.SIGCONT)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    assert waited >= TIMEOUT_SECONDS  # it asked the node first


def http_pid(node: NodeProcess) -> int:
    """The HTTP process, by the name the node's process table gives it."""
    table = json.loads(node.cli("status", "--json").stdout)["processes"]
    return next(p["pid"] for p in table if p["name"] == "http")


def test_a_socket_left_by_a_killed_node_is_replaced_and_a_live_one_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "admin.sock"
    first = bind_admin_socket(path)
    assert first is not None
    with caplog.at_level(logging.WARNING):
        assert bind_admin_socket(path) is None  # another node answers there
    assert "another node answers" in caplog.text
    first.close()  # killed: the file stays, nobody listens
    assert path.exists()
    second = bind_admin_socket(path)
    assert second is not None
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    client.close()
    second.close()

    too_long = tmp_path / ("x" * 120)
    with caplog.at_level(logging.WARNING):
        assert bind_admin_socket(too_long) is None
    assert "too long" in caplog.text and not too_long.exists()
