"""Ingest throughput: `ainode serve` against DCMTK storescp and Orthanc, same files, same run.

Sends every DICOM file of ../shared/data with DCMTK storescu over loopback, with 1 and 4
parallel associations, and prints images/s, MB/s and the ratio to storescp (medians).
The node flushes every file before it answers; storescp never does, Orthanc only as
"orthanc sync" (SyncStorageArea), which is the like-for-like peer.

    python bench/ingest.py [--runs 7] [--receivers 1 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.peers import free_port  # noqa: E402  (below the ephemeral range: restarts rebind)

DATA = REPO.parent / "shared" / "data"
TOOLS = REPO.parent / "shared" / "tools"
STORESCU = shutil.which("storescu", path="/usr/bin:/usr/local/bin") or "storescu"
STORESCP = shutil.which("storescp", path="/usr/bin:/usr/local/bin") or "storescp"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Target:
    name: str
    port: int
    ae_title: str
    reset: Callable[[], None]


def dicom_files() -> list[Path]:
    return sorted(p for p in DATA.rglob("*.dcm") if p.is_file())


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_ticks(pid: int) -> int:
    """CPU time of `pid` and its children, in clock ticks (Linux /proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat.parent.name == str(pid) or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total


def wait_until_settled(pid: int, timeout: float = 120.0) -> None:
    """Until the process tree of `pid` is idle (under 5 % of a core for half a second)."""
    deadline = time.monotonic() + timeout
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    before = cpu_ticks(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        after = cpu_ticks(pid)
        if after - before < 0.05 * 0.5 * ticks_per_second:
            return
        before = after
    raise RuntimeError(f"process {pid} still busy after {timeout} s")


def send(target: Target, files: list[Path], associations: int) -> float:
    """Seconds to send `files` split over `associations` parallel storescu processes."""
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aet", "BENCH", "-aec", target.ae_title, "-R", "-xs"]
            + ["127.0.0.1", str(target.port)]
            + [str(p) for p in chunk],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu to {target.name} failed: {err.decode()[-400:]}")
    return time.perf_counter() - start


@contextmanager
def storescp(workdir: Path) -> Iterator[Target]:
    port = free_port()
    out = workdir / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [STORESCP, "-aet", "STORESCP", "+xa", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)

        def reset() -> None:
            for f in out.iterdir():
                f.unlink()

        yield Target("storescp", port, "STORESCP", reset)
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def orthanc(workdir: Path, sync_storage: bool) -> Iterator[Target]:
    """Orthanc as orthanc-up makes it; `sync_storage` flushes each file as the node does."""
    work = workdir / ("orthanc-sync" if sync_storage else "orthanc")
    subprocess.run(
        [str(TOOLS / "orthanc-up"), "-p", "auto", "-H", "auto", "-a", "ORTHANC", str(work)]
        + (["--sync-storage"] if sync_storage else []),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    env = dict(
        line.removeprefix("export ").split("=", 1)
        for line in (work / "orthanc.env").read_text().splitlines()
        if "=" in line
    )
    env = {k: v.strip("'\"") for k, v in env.items()}
    url = env["ORTHANC_URL"]
    try:

        def reset() -> None:
            for patient in httpx.get(f"{url}/patients").json():
                httpx.delete(f"{url}/patients/{patient}")

        name = "orthanc sync" if sync_storage else "orthanc"
        yield Target(name, int(env["ORTHANC_DICOM_PORT"]), "ORTHANC", reset)
    finally:
        subprocess.run([str(TOOLS / "orthanc-down"), "--purge", str(work)], check=False)


@contextmanager
def ainode(
    workdir: Path, receivers: int, extra: str = "", name: str | None = None
) -> Iterator[Target]:
    """`ainode serve` with `receivers`; `extra` is appended to its config (YAML)."""
    port = free_port()
    name = name or f"ainode x{receivers}"
    home = workdir / name.replace(" ", "-")
    home.mkdir()
    config = home / "config.yaml"
    config.write_text(
        f"node: {{ae_title: AINODE, host: 127.0.0.1, port: {port}, "
        f"accept_unknown_peers: true, receivers: {receivers}}}\n"
        "completion: {quiet_seconds: 2}\nlogging: {level: WARNING}\n" + extra
    )
    state: dict[str, subprocess.Popen[bytes]] = {}

    def start() -> None:
        shutil.rmtree(home / "var", ignore_errors=True)
        state["proc"] = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(config)],
            cwd=home,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port)
        wait_until_settled(state["proc"].pid)  # every receiver bound, every worker loaded

    def stop() -> None:
        state["proc"].terminate()
        state["proc"].wait(timeout=30)

    def reset() -> None:
        stop()
        start()

    start()
    try:
        yield Target(name, port, "AINODE", reset)
    finally:
        stop()


def flush_seconds(files: list[Path], workdir: Path, runs: int) -> float:
    """What flushing each file before answering costs on this disk, in all: writing and
    renaming `files` one by one with an fsync each, less the same without (median)."""
    folder = workdir / "flush"
    folder.mkdir()
    contents = [p.read_bytes() for p in files]

    def write_all(flush: bool) -> float:
        start = time.perf_counter()
        for number, content in enumerate(contents):
            temp = folder / f"{number}.part"
            with temp.open("wb") as file:
                file.write(content)
                if flush:
                    file.flush()
                    os.fsync(file.fileno())
            temp.replace(folder / f"{number}.dcm")
        seconds = time.perf_counter() - start
        shutil.rmtree(folder)
        folder.mkdir()
        return seconds

    return statistics.median(write_all(True) - write_all(False) for _ in range(runs))


def measure(target: Target, files: list[Path], associations: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        target.reset()
        times.append(send(target, files, associations))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--receivers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-orthanc", action="store_true")
    args = parser.parse_args()
    files = dicom_files()
    if not files:
        sys.exit(f"no DICOM files under {DATA}")
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    print(f"{len(files)} files, {megabytes:.0f} MB, median of {args.runs} runs, loopback")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results: dict[tuple[str, int], float] = {}
        peers = [lambda: storescp(work)]
        if not args.no_orthanc:
            peers += [lambda: orthanc(work, False), lambda: orthanc(work, True)]
        peers += [lambda n=n: ainode(work, n) for n in args.receivers]
        for make in peers:
            with make() as target:
                for associations in (1, 4):
                    seconds = measure(target, files, associations, args.runs)
                    results[(target.name, associations)] = seconds
                    print(f"  {target.name}, {associations} assoc.: {seconds:.2f} s", flush=True)
        flush = flush_seconds(files, work, args.runs)
        print(f"{'receiver':<14}{'assoc':>6}{'img/s':>9}{'MB/s':>8}{'x storescp':>12}")
        for (name, associations), seconds in results.items():
            reference = results[("storescp", associations)]
            print(
                f"{name:<14}{associations:>6}{len(files) / seconds:>9.0f}"
                f"{megabytes / seconds:>8.1f}{reference / seconds:>12.2f}"
            )
        ceiling = results[("storescp", 1)] + flush
        print(
            f"one association, flushing each instance before answering (as the node does) costs "
            f"{flush / len(files) * 1000:.2f} ms on this disk: a receiver as fast as storescp "
            f"could reach {len(files) / ceiling:.0f} img/s "
            f"({results[('storescp', 1)] / ceiling:.2f} x storescp)"
        )


if __name__ == "__main__":
    main()
