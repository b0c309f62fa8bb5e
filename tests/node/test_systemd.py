"""Under systemd (`Type=notify`, `WatchdogSec`): the node says READY=1 once every process
serves, pings the watchdog while it supervises, and says STOPPING=1 when stopped; the
shipped unit passes `systemd-analyze verify` and its security review."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import wait_until

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "ainode.service"


def test_the_node_tells_systemd_it_is_ready_alive_and_stopping(
    start_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(address))
    listener.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))  # as systemd sets them
    monkeypatch.setenv("WATCHDOG_USEC", "1500000")  # WatchdogSec=1.5: a ping every 0.5 s
    heard: list[str] = []

    def heard_so_far() -> list[str]:
        try:
            while True:
                heard.append(listener.recv(4096).decode())
        except TimeoutError:
            return heard

    node = start_node(workers={"count": 0})
    assert wait_until(lambda: any(m.startswith("READY=1") for m in heard_so_far()), 30)
    assert "node AINODE ready" in node.log()
    assert wait_until(lambda: heard_so_far().count("WATCHDOG=1") >= 2, 10)
    node.stop()
    assert "STOPPING=1" in heard_so_far()
    listener.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = tmp_path / "ainode.service"  # its ExecStart where this checkout's node is
    ainode = Path(sys.executable).with_name("ainode")
    unit.write_text(UNIT.read_text().replace("/opt/ainode/.venv/bin/ainode", str(ainode)))
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0, verified.stderr
    review = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    score = float(
        review.stdout.rsplit("Overall exposure level for ainode.service:", 1)[1].split()[0]
    )
    assert score <= 2.0, review.stdout  # 9.2 "UNSAFE" before the hardening
