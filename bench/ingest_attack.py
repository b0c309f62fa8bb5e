"""Ingest under attack: the node's throughput with 4 storescu associations (every file of
../shared/data), alone and while 50 trickling connections and a mutation fuzzer hit the same
port; the ratio, and the node's peak RSS in each phase. DCMTK storescp, measured in the same
run, is the reference for the clean figure.

    python bench/ingest_attack.py [--runs 3] [--tricklers 50]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import Target, ainode, dicom_files, send, storescp  # noqa: E402
from tests import dicom_wire as wire  # noqa: E402
from tests.e2e.test_fuzz import exchange, mutate  # noqa: E402
from tests.e2e.test_fuzz import send as send_mutant  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    """The high-water mark of resident memory of `pid` and its children (VmHWM), MB."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":", 1) for line in status.read_text().splitlines() if ":" in line
            )
        except OSError:
            continue
        if status.parent.name == str(pid) or fields.get("PPid", "").strip() == str(pid):
            total += int(fields.get("VmHWM", "0 kB").split()[0])
    return total / 1024


class Attack:
    """Tricklers (an A-ASSOCIATE-RQ a byte every half second, reconnecting when cut off)
    and a fuzzer (mutated exchanges, one after another), until stopped."""

    def __init__(self, port: int, tricklers: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.cut_off = 0
        self.mutants = 0
        self._threads = [
            threading.Thread(target=self._trickle, daemon=True) for _ in range(tricklers)
        ]
        self._threads.append(threading.Thread(target=self._fuzz, daemon=True))

    def __enter__(self) -> Attack:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _trickle(self) -> None:
        request = wire.associate_rq(calling="BENCH")
        while not self.stop.is_set():
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
            ):
                for byte in request:
                    if self.stop.wait(0.5):
                        return
                    raw.sendall(bytes([byte]))
            self.cut_off += 1

    def _fuzz(self) -> None:
        rng = random.Random(1)
        base = exchange()
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                send_mutant(self.port, mutate(base, rng))
            self.mutants += 1


def throughput(
    target: Target, files: list[Path], runs: int, tricklers: int = 0
) -> tuple[float, float, str]:
    """Images per second (median of `runs`, a fresh node each), the node's peak RSS (MB),
    and what the attack did; with `tricklers`, the attack runs through each send."""
    times, rss, done = [], 0.0, ""
    for _ in range(runs):
        target.reset()
        if tricklers:
            with Attack(target.port, tricklers) as attack:
                time.sleep(2)  # every trickler connected, the fuzzer going
                times.append(send(target, files, 4))
            done = f"{attack.mutants} mutated exchanges, {attack.cut_off} trickles cut off"
        else:
            times.append(send(target, files, 4))
        with contextlib.suppress(RuntimeError):
            rss = max(rss, peak_rss_mb(node_pid(target.port)))
    return len(files) / statistics.median(times), rss, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tricklers", type=int, default=50)
    args = parser.parse_args()
    files = dicom_files()
    if not files:
        sys.exit("no DICOM files under ../shared/data")
    print(f"{len(files)} files, 4 associations, median of {args.runs} runs, loopback")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with storescp(work) as reference:
            storescp_rate, _, _ = throughput(reference, files, args.runs)
        with ainode(work, 1) as node:
            clean, clean_rss, _ = throughput(node, files, args.runs)
            attacked, attacked_rss, done = throughput(node, files, args.runs, args.tricklers)
    print(f"  attack per run: {args.tricklers} tricklers; {done}")
    print(f"{'phase':<24}{'img/s':>8}{'x storescp':>12}{'peak RSS MB':>13}")
    print(f"{'storescp':<24}{storescp_rate:>8.0f}{1.0:>12.2f}{'':>13}")
    for name, rate, rss in (
        ("ainode x1 clean", clean, clean_rss),
        ("ainode x1 under attack", attacked, attacked_rss),
    ):
        print(f"{name:<24}{rate:>8.0f}{rate / storescp_rate:>12.2f}{rss:>13.0f}")
    print(f"under attack / clean: {attacked / clean:.2f} (target >= 0.9)")


def node_pid(port: int) -> int:
    """The pid of the process listening on `port` (Linux /proc/net/tcp and fd links)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
            inode = fields[9]
            break
    if inode is None:
        raise RuntimeError(f"nothing listens on port {port}")
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if fd.readlink().name == f"socket:[{inode}]" or str(fd.readlink()) == (
                f"socket:[{inode}]"
            ):
                return int(fd.parts[2])
    raise RuntimeError(f"no process owns the socket of port {port}")


if __name__ == "__main__":
    main()
