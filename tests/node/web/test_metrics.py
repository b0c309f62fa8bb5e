"""`/metrics` of a real node, scraped around real sends: the counters move by what was sent,
whichever process counted it (receiver, HTTP, scheduler)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from node.ingest.part10 import read_part10
from tests.node.edge.test_scp import ct_dataset
from tests.node.web.conftest import WebNode
from tests.node.web.test_stow import body, part10, post
from tests.peers import NodeProcess, storescu, wait_until


def scrape(web: WebNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{web.url}/metrics", headers=web.auth("viewer")).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_by_what_was_sent(start_web_node, tmp_path: Path) -> None:
    web = start_web_node(
        workers={"count": 0}, completion={"quiet_seconds": 1, "release_grace_seconds": 0.2}
    )
    assert httpx.get(f"{web.url}/metrics").status_code == 401  # a reader's token, as any read
    before = scrape(web)
    files = []
    for index in range(3):
        path = tmp_path / f"{index}.dcm"
        ct_dataset(generate_uid()).save_as(path, enforce_file_format=True)
        files.append(path)
    storescu(web.node.port, files)
    sent = [part10(ct_dataset(generate_uid())) for _ in range(2)]
    assert post(web, body(*sent, b"garbage")).status_code == 202

    def settled() -> dict | None:
        now = scrape(web)
        done = value(now, "ainode_series_completion_delay_seconds_count") >= 5
        return now if done else None

    after = wait_until(settled, timeout=30, interval=0.5)
    received = "ainode_instances_received_total"
    for source, status, count in (
        ("dimse", "success", 3),
        ("dicomweb", "success", 2),
        ("dicomweb", "cannot_understand", 1),
    ):
        moved = value(after, received, source=source, status=status) - value(
            before, received, source=source, status=status
        )
        assert moved == count, (source, status, moved)
    stowed = value(after, "ainode_received_bytes_total", source="dicomweb") - value(
        before, "ainode_received_bytes_total", source="dicomweb"
    )
    assert stowed == sum(len(p) - read_part10(p).dataset_offset for p in sent)  # datasets
    assert value(after, "ainode_open_associations") == 0
    assert value(after, "ainode_disk_free_bytes") > 0


def metrics_dir(node: NodeProcess) -> Path:
    """Where the node's processes count, as its children's environment says (the main process
    sets it after it started)."""
    for child in node.children():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        for entry in environ:
            if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                return Path(entry.split(b"=", 1)[1].decode())
    raise AssertionError("no child of the node has PROMETHEUS_MULTIPROC_DIR")


def test_a_killed_nodes_metrics_directory_is_removed_by_the_next_start(
    start_web_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL leaves no chance to clean up: the next node to start removes what it left, and
    not what a running node uses. These nodes have a temporary folder of their own: a node
    another test starts meanwhile would clean up the shared one first."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the nodes' temporary folder
    running = start_web_node(workers={"count": 0}).node
    killed = start_web_node(workers={"count": 0}).node
    left = metrics_dir(killed)
    assert left.parent == tmp_path / "tmp"
    children = killed.children()
    killed.kill()
    wait_until(lambda: not any(Path(f"/proc/{child}").exists() for child in children), 30)
    assert left.is_dir()

    started = start_web_node(workers={"count": 0}).node
    assert not left.exists()
    assert metrics_dir(running).is_dir() and metrics_dir(started).is_dir()
    assert f"removed {left}" in started.log()
