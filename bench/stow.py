"""DICOMweb throughput: STOW-RS into `ainode serve` beside its own C-STORE and Orthanc's STOW-RS,
same files, same run; WADO-RS of one series from the node and from Orthanc; the HTTP
process's peak RSS after a one-instance request and after the whole data set in one request.

Each client streams its share of ../shared/data as one multipart/related request (read from
disk as it goes). Orthanc is measured as orthanc-up makes it and with SyncStorageArea (files
flushed before the answer, as the node does).

    python bench/stow.py [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import (  # noqa: E402
    Target,
    dicom_files,
    free_port,
    measure,
    orthanc,
    wait_for_port,
    wait_until_settled,
)
from bench.ingest_attack import peak_rss_mb  # noqa: E402

BOUNDARY = "ainode-bench-boundary"
CHUNK = 1 << 20


@dataclass
class Node:
    port: int
    dicomweb: str
    proc: subprocess.Popen[bytes] | None = None


def body(files: list[Path]) -> Iterator[bytes]:
    for path in files:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with path.open("rb") as file:
            while chunk := file.read(CHUNK):
                yield chunk
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def stow(dicomweb: str, files: list[Path]) -> None:
    response = httpx.post(
        f"{dicomweb}/studies",
        content=body(files),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        },
        timeout=600,
    )
    if response.status_code != 200:
        raise RuntimeError(f"STOW-RS to {dicomweb}: {response.status_code} {response.text[:300]}")


def stow_parallel(dicomweb: str, files: list[Path], clients: int) -> float:
    shares = [files[i::clients] for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda share: stow(dicomweb, share), shares))
    return time.perf_counter() - start


def wado_series(dicomweb: str, study: str, series: str) -> float:
    start = time.perf_counter()
    with httpx.stream(
        "GET",
        f"{dicomweb}/studies/{study}/series/{series}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=600,
    ) as response:
        response.raise_for_status()
        for _ in response.iter_bytes(CHUNK):
            pass
    return time.perf_counter() - start


@contextmanager
def node(workdir: Path) -> Iterator[tuple[Node, Callable[[], None]]]:
    """A node with one receiver, no worker, its HTTP server open to anonymous senders (only
    the HTTP process is a child: its RSS is the children's)."""
    port, http_port = free_port(), free_port()
    home = workdir / "ainode"
    home.mkdir()
    config = home / "config.yaml"
    config.write_text(
        f"node: {{ae_title: AINODE, host: 127.0.0.1, port: {port}, accept_unknown_peers: true,"
        " receivers: 1}\n"
        f"http: {{host: 127.0.0.1, port: {http_port}, auth: {{anonymous: [sender, reader]}}}}\n"
        "workers: {count: 0}\ncompletion: {quiet_seconds: 2}\nlogging: {level: WARNING}\n"
    )
    running = Node(port, f"http://127.0.0.1:{http_port}/dicom-web")

    def stop() -> None:
        if running.proc is not None:
            running.proc.terminate()
            running.proc.wait(timeout=30)

    def restart() -> None:
        stop()
        shutil.rmtree(home / "var", ignore_errors=True)
        running.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(config)],
            cwd=home,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port)
        wait_for_port(http_port)
        wait_until_settled(running.proc.pid)

    restart()
    try:
        yield running, restart
    finally:
        stop()


def children_rss_mb(pid: int) -> float:
    return peak_rss_mb(pid) - own_rss_mb(pid)


def own_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    files = dicom_files()
    if not files:
        sys.exit("no DICOM files under ../shared/data")
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    series_dir = REPO.parent / "shared" / "data" / "lung-pet-ct-dx" / "A0001" / "series-2"
    first = pydicom.dcmread(sorted(series_dir.glob("*.dcm"))[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    print(f"{len(files)} files, {megabytes:.0f} MB, median of {args.runs} runs, loopback")
    results: dict[tuple[str, int], float] = {}
    wado: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with node(work) as (running, restart):
            cstore = Target("ainode C-STORE", running.port, "AINODE", restart)
            for clients in (1, 4):
                results[("ainode C-STORE", clients)] = measure(cstore, files, clients, args.runs)
                times = []
                for _ in range(args.runs):
                    restart()
                    times.append(stow_parallel(running.dicomweb, files, clients))
                results[("ainode STOW-RS", clients)] = statistics.median(times)
                print(f"  ainode, {clients} clients: done", flush=True)
            assert running.proc is not None
            restart()
            stow(running.dicomweb, files[:1])
            one = children_rss_mb(running.proc.pid)
            restart()
            stow(running.dicomweb, files)
            whole = children_rss_mb(running.proc.pid)
            wado["ainode"] = statistics.median(
                wado_series(running.dicomweb, study, series) for _ in range(max(args.runs, 5))
            )
        for sync in (False, True):
            with orthanc(work, sync) as target:
                url = orthanc_dicomweb(work, sync)
                for clients in (1, 4):
                    times = []
                    for _ in range(args.runs):
                        target.reset()
                        times.append(stow_parallel(url, files, clients))
                    results[(f"{target.name} STOW-RS", clients)] = statistics.median(times)
                if not sync:
                    wado["orthanc"] = statistics.median(
                        wado_series(url, study, series) for _ in range(max(args.runs, 5))
                    )
    print(f"{'receiver':<22}{'clients':>8}{'img/s':>8}{'MB/s':>8}{'x node C-STORE':>16}")
    for (name, clients), seconds in results.items():
        reference = results[("ainode C-STORE", clients)]
        print(
            f"{name:<22}{clients:>8}{len(files) / seconds:>8.0f}{megabytes / seconds:>8.1f}"
            f"{reference / seconds:>16.2f}"
        )
    print(
        f"HTTP process peak RSS: {one:.0f} MB after one instance, {whole:.0f} MB after "
        f"{megabytes:.0f} MB in one request"
    )
    print(
        f"WADO-RS of one series ({len(list(series_dir.glob('*.dcm')))} instances, as stored): "
        f"ainode {wado['ainode'] * 1000:.0f} ms, orthanc {wado['orthanc'] * 1000:.0f} ms "
        f"(x{wado['orthanc'] / wado['ainode']:.2f})"
    )


def orthanc_dicomweb(work: Path, sync: bool) -> str:
    env = (work / ("orthanc-sync" if sync else "orthanc") / "orthanc.env").read_text()
    for line in env.splitlines():
        if "ORTHANC_DICOMWEB_URL=" in line:
            return line.split("=", 1)[1].strip("'\"")
    raise RuntimeError("orthanc.env has no ORTHANC_DICOMWEB_URL")


if __name__ == "__main__":
    main()
