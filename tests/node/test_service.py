"""`ainode serve` with several receiver processes sharing the port."""

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.peers import NodeProcess, storescu, wait_until


def receiver_pids(node: NodeProcess) -> list[int]:
    assert node.proc is not None
    out = subprocess.run(
        ["pgrep", "-P", str(node.proc.pid), "-f", "multiprocessing.spawn"],
        capture_output=True,
        text=True,
    ).stdout
    return [int(pid) for pid in out.split()]


def receivers_up(node: NodeProcess, count: int) -> list[int] | None:
    """PIDs of the extra receivers, once `count` of them log that they listen."""
    pids = receiver_pids(node)
    listening = node.log().count("listening as AINODE")
    return pids if len(pids) == count and listening >= count + 1 else None


@pytest.mark.slow
def test_receivers_share_the_port_survive_a_crash_and_stop_together(
    start_node: Callable[..., NodeProcess], real_series: dict[str, list[Path]]
) -> None:
    node = start_node(node={"receivers": 3}, workers={"count": 0})
    [first, _] = wait_until(lambda: receivers_up(node, 2), timeout=30)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: "restarting" in node.log() and receivers_up(node, 2), timeout=30)
    assert first not in receiver_pids(node)

    batches = [real_series[name] for name in ("covid", "cap", "normal", "lung-kernel")]
    threads = [threading.Thread(target=storescu, args=(node.port, files)) for files in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = {
        str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID): len(files)
        for files in batches
    }

    def counts() -> dict[str, int] | None:
        series = node.series()
        done = all(series.get(uid, {}).get("state") == "complete" for uid in expected)
        return {uid: series[uid]["instances"] for uid in expected} if done else None

    assert wait_until(counts, timeout=20) == expected
    pids = receiver_pids(node)
    assert node.stop(signal.SIGTERM, timeout=40) == 0
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


def test_the_main_process_and_a_receiver_load_no_model_library() -> None:
    """The main process (which starts every other), receivers and config checks start in a
    fraction of a second: no torch, no MONAI. Only a worker loads them."""
    probe = (
        "import sys, node.service, node.ingest.receiver, node.config; "
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
