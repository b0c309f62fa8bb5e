"""Ingest under attack: the node's throughput with 4 storescu associations (every file of
../shared/data), alone, while 50 trickling connections and a mutation fuzzer hit the DICOM
port, and while its HTTP port is attacked (slowloris heads, header floods, frame-list
amplification); the ratios, the node's peak RSS in each phase, and the p99 latency of
/healthz during the HTTP attack. DCMTK storescp, measured in the same run, is the reference
for the clean figure.

    python bench/ingest_attack.py [--runs 5] [--tricklers 50] [--slowloris 300]

Each round runs the three phases once, in turn, so that the machine's drift falls on them
alike; a ratio is the median of the rounds' own ratios, printed with their spread.
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
from collections.abc import Callable
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import Target, ainode, dicom_files, send, storescp  # noqa: E402
from tests import dicom_wire as wire  # noqa: E402
from tests.e2e.test_fuzz import exchange, mutate  # noqa: E402
from tests.e2e.test_fuzz import send as send_mutant  # noqa: E402
from tests.peers import free_port  # noqa: E402


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


class Attacker:
    """Threads that attack a port from `with` until its end."""

    def __init__(self, port: int, targets: list[Callable[[], None]]) -> None:
        self.port = port
        self.stop = threading.Event()
        self._threads = [threading.Thread(target=target, daemon=True) for target in targets]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=10)


class Attack(Attacker):
    """Tricklers (an A-ASSOCIATE-RQ a byte every half second, reconnecting when cut off)
    and a fuzzer (mutated exchanges, one after another), until stopped."""

    def __init__(self, port: int, tricklers: int) -> None:
        super().__init__(port, [self._trickle] * tricklers + [self._fuzz])
        self.cut_off = 0
        self.mutants = 0

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


HEALTH_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


class HttpAttack(Attacker):
    """Slowloris heads (a header line every second, reconnecting when cut off), header
    floods (unterminated 1 MiB heads, 40 a second) and frame-list amplification (18 kB URLs,
    100 a second), against the HTTP port, while a prober times /healthz every 50 ms."""

    def __init__(self, port: int, slowloris: int) -> None:
        targets = [self._slowloris] * slowloris + [self._flood] * 4 + [self._amplify] * 2
        super().__init__(port, [*targets, self._probe])
        self.cut_off = self.floods = self.frames = 0
        self.latencies: list[float] = []

    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def _slowloris(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError), self._connect() as raw:
                raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                while not self.stop.wait(1.0):
                    raw.sendall(b"X-Slow: 1\r\n")
            self.cut_off += 1

    def _flood(self) -> None:
        """1 MiB unterminated heads, ten a second per thread: the attacker shares the node's
        two cores here, and an unbounded loop would measure its own CPU, not the node."""
        while not self.stop.wait(0.1):
            with contextlib.suppress(OSError), self._connect() as raw:
                raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
                for _ in range(16):
                    raw.sendall(b"a" * 65536)
            self.floods += 1

    def _amplify(self) -> None:
        path = "/dicom-web/studies/1.2/series/3.4/instances/5.6/frames/" + ",".join(["1"] * 9000)
        while not self.stop.wait(0.02):
            with contextlib.suppress(OSError), self._connect() as raw:
                raw.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                raw.recv(4096)
            self.frames += 1

    def _probe(self) -> None:
        while not self.stop.wait(0.05):
            started = time.perf_counter()
            with contextlib.suppress(OSError), self._connect() as raw:
                raw.sendall(
                    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                if raw.recv(64).startswith(b"HTTP/1.1 200"):
                    self.latencies.append(time.perf_counter() - started)

    def p99_ms(self) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[int(0.99 * (len(ordered) - 1))] if ordered else float("nan")


def throughput(
    target: Target,
    files: list[Path],
    runs: int,
    tricklers: int = 0,
    http: tuple[int, int] | None = None,
) -> tuple[float, float, str]:
    """Images per second (median of `runs`, a fresh node each), the node's peak RSS (MB),
    and what the attack did; with `tricklers`, the DIMSE attack runs through each send, with
    `http` (port, slowloris connections) the HTTP attack."""
    times, rss, done = [], 0.0, ""
    for _ in range(runs):
        target.reset()
        if tricklers:
            with Attack(target.port, tricklers) as attack:
                time.sleep(2)  # every trickler connected, the fuzzer going
                times.append(send(target, files, 4))
            done = f"{attack.mutants} mutated exchanges, {attack.cut_off} trickles cut off"
        elif http is not None:
            with HttpAttack(*http) as assault:
                time.sleep(2)
                times.append(send(target, files, 4))
            done = (
                f"{assault.cut_off} slowloris cut off, {assault.floods} header floods, "
                f"{assault.frames} frame lists; /healthz p99 {assault.p99_ms():.0f} ms "
                f"({len(assault.latencies)} probes)"
            )
        else:
            times.append(send(target, files, 4))
        with contextlib.suppress(RuntimeError):
            rss = max(rss, peak_rss_mb(node_pid(target.port)))
    return len(files) / statistics.median(times), rss, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tricklers", type=int, default=50)
    parser.add_argument("--slowloris", type=int, default=300)
    args = parser.parse_args()
    files = dicom_files()
    if not files:
        sys.exit("no DICOM files under ../shared/data")
    print(f"{len(files)} files, 4 associations, {args.runs} rounds of the three phases, loopback")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with storescp(work) as reference:
            storescp_rate, _, _ = throughput(reference, files, args.runs)
        http_port = free_port()
        web = f"http: {{host: 127.0.0.1, port: {http_port}, header_timeout_seconds: 10}}\n"
        with ainode(work, 1, extra=web) as node:
            # one run of each phase per round, so that the machine's drift (other load, disk
            # caches) falls on the three alike; each ratio is taken within its round
            rounds = [
                (
                    throughput(node, files, 1),
                    throughput(node, files, 1, args.tricklers),
                    throughput(node, files, 1, http=(http_port, args.slowloris)),
                )
                for _ in range(args.runs)
            ]
    print(f"  DIMSE attack per run: {args.tricklers} tricklers; {rounds[-1][1][2]}")
    print(f"  HTTP attack per run: {args.slowloris} slowloris; {rounds[-1][2][2]}")
    print(f"{'phase':<28}{'img/s':>8}{'x storescp':>12}{'peak RSS MB':>13}")
    print(f"{'storescp':<28}{storescp_rate:>8.0f}{1.0:>12.2f}{'':>13}")
    names = ("ainode x1 clean", "ainode x1 DIMSE attack", "ainode x1 HTTP attack")
    for phase, name in enumerate(names):
        rate = statistics.median(r[phase][0] for r in rounds)
        rss = max(r[phase][1] for r in rounds)
        print(f"{name:<28}{rate:>8.0f}{rate / storescp_rate:>12.2f}{rss:>13.0f}")
    for phase, name in ((1, "DIMSE"), (2, "HTTP")):
        ratios = [r[phase][0] / r[0][0] for r in rounds]
        spread = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        print(
            f"{name} attack / clean: {statistics.median(ratios):.2f} median of rounds ({spread})"
            f" (target >= 0.9{'; /healthz p99 < 100 ms' if phase == 2 else ''})"
        )


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
