"""The node as separately started roles on one host (issue 26): an edge, an HTTP server, two
coordinators and a worker tree share one store and database; DCMTK storescu sends a series to
the edge, the worker's result reaches a storescp PACS. One coordinator coordinates, the other
stands by and takes over when the first is killed; every tree drains on SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pydicom

from node.ops.processes import tree_health
from tests.peers import (
    ECHO_TO_PACS,
    NodeProcess,
    PostgresServer,
    free_port,
    node_settings,
    storescp,
    storescu,
    wait_until,
)
from tests.phantoms import chest, chest_geometry, write_series

TOPOLOGY = (("edge",), ("http",), ("coordinator",), ("coordinator",), ("worker",))


def coordinators(node: NodeProcess) -> dict[int, bool]:
    """Each coordinator tree's main process, and whether it coordinates now."""
    return {
        p["pid"]: bool(p["coordinating"])
        for p in node.status()["processes"]
        if p["name"] == "main" and p["alive"] and p["coordinating"] is not None
    }


def one_active(node: NodeProcess, among: set[int]) -> int | None:
    held = coordinators(node)
    active = [pid for pid, coordinating in held.items() if coordinating]
    return active[0] if set(held) == among and len(active) == 1 else None


def test_roles_started_apart_serve_and_a_standby_coordinator_takes_over(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """On PostgreSQL, the database trees on several hosts share (one host's trees on SQLite
    work the same way: every other end-to-end test runs them in one tree)."""
    home = tmp_path / "node"
    home.mkdir()
    url = postgres.new_database("roles")
    rules = tmp_path / "rules.yaml"
    rules.write_text(ECHO_TO_PACS)
    pacs_port, port = free_port(), free_port()
    peers: dict[str, Any] = {
        "modality": {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 104},
        "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
    }
    settings = node_settings(
        home, port, url,
        workers={"count": 1}, peers=peers, routing={"rules_file": str(rules)},
        completion={"quiet_seconds": 1, "release_grace_seconds": 0.2},
        http={"host": "127.0.0.1", "port": free_port(), "auth": {"anonymous": ["reader"]}},
    )  # fmt: skip
    trees = [NodeProcess(home, port, settings, roles=roles) for roles in TOPOLOGY]
    received = tmp_path / "pacs"
    try:
        for tree in trees:
            tree.launch()
        for tree in trees:
            tree.wait_ready()
        by_pid = {tree.proc.pid: tree for tree in trees if tree.proc is not None}
        standing = {tree.proc.pid for tree in trees[2:4] if tree.proc is not None}
        active = wait_until(lambda: one_active(trees[0], standing), timeout=30, interval=0.5)
        assert all(tree_health(home / "storage", roles, 10).serving for roles in TOPOLOGY)
        assert trees[4].cli("health", "--role", "worker").returncode == 0

        with storescp(pacs_port, received):
            storescu(port, write_series(tmp_path / "first", chest_geometry(), chest()))
            wait_until(lambda: len(list(received.iterdir())) == 1, timeout=90, interval=0.5)

            by_pid[active].kill()
            (successor,) = standing - {active}
            assert wait_until(lambda: coordinators(trees[0]).get(successor), 40, interval=0.5)
            storescu(port, write_series(tmp_path / "second", chest_geometry(), chest()))
            wait_until(lambda: len(list(received.iterdir())) == 2, timeout=90, interval=0.5)
        assert {pydicom.dcmread(f).Modality for f in received.iterdir()} == {"SR"}

        for tree in trees:
            if tree.proc is not None and tree.proc.poll() is None:
                assert tree.stop(signal.SIGTERM) == 0, tree.log()
        for roles in TOPOLOGY:
            assert not tree_health(home / "storage", roles, 10).serving
        assert trees[4].cli("health", "--role", "worker").returncode == 1
    finally:
        for tree in trees:
            if tree.proc is not None and tree.proc.poll() is None:
                tree.kill()
