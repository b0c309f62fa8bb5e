"""Admin API latency and what metrics cost the receive path.

1. `GET /api/v1/series`, `GET /api/v1/status` and `GET /metrics` of `ainode serve` with
   `--series` series (and a job each) in its catalog, on SQLite and on PostgreSQL: p50 and
   p99 of `--requests` sequential requests after a warm-up.
2. C-STORE of ../shared/data into the node with metrics on (the HTTP server configured:
   every process counts into prometheus-client's multiprocess files) and off (no HTTP
   server), alternating, in the same run: the median of `--runs` sends each, and the ratio.

    python bench/api.py [--series 10000] [--requests 200] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from sqlalchemy import insert, select

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import ainode, dicom_files, measure, wait_for_port  # noqa: E402
from node.store.db.engine import make_engine  # noqa: E402
from node.store.db.migrate import upgrade  # noqa: E402
from node.store.db.models import Job, Series, Study, WorkState, utcnow  # noqa: E402
from tests.peers import PostgresServer, free_port  # noqa: E402

SERIES_PER_STUDY = 10
STATES = [WorkState.SUCCEEDED] * 8 + [WorkState.FAILED, WorkState.QUEUED]
HTTP = "http: {{host: 127.0.0.1, port: {port}, auth: {{anonymous: [reader]}}}}\n"


def fill(url: str, series: int) -> None:
    """`series` complete series in studies of ten, each with one job (most succeeded)."""
    engine = make_engine(url)
    upgrade(engine)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(Study),
            [
                {"study_instance_uid": f"1.2.{i}", "first_received_at": now}
                for i in range(series // SERIES_PER_STUDY)
            ],
        )
        studies = conn.execute(select(Study.id)).scalars().all()
        conn.execute(
            insert(Series),
            [
                {
                    "study_id": studies[i // SERIES_PER_STUDY],
                    "series_instance_uid": f"1.2.{i // SERIES_PER_STUDY}.{i}",
                    "modality": "CT",
                    "series_description": "CHEST 1.0 B31f",
                    "calling_ae": "CT_SCANNER",
                    "first_received_at": now,
                    "last_received_at": now,
                    "completed_at": now,
                    "instance_count": 300,
                    "routed_revision": 1,
                    "revision": 1,
                    "state": "complete",
                }
                for i in range(series)
            ],
        )
        ids = conn.execute(select(Series.id)).scalars().all()
        conn.execute(
            insert(Job),
            [
                {
                    "series_id": series_id,
                    "revision": 1,
                    "pipeline": "lung-quant",
                    "destinations": ["origin"],
                    "rules": ["chest"],
                    "priority": index % 3,
                    "state": STATES[index % len(STATES)],
                    "attempts": 1,
                    "max_attempts": 3,
                    "created_at": now,
                    "run_after": now,
                }
                for index, series_id in enumerate(ids)
            ],
        )
    engine.dispose()


@contextmanager
def serve(workdir: Path, url: str) -> Iterator[str]:
    """`ainode serve` on the catalog at `url`, HTTP open to anonymous readers."""
    port, http = free_port(), free_port()
    workdir.mkdir()
    config = workdir / "config.yaml"
    config.write_text(
        f"node: {{host: 127.0.0.1, port: {port}, accept_unknown_peers: true}}\n"
        f"database: {{url: '{url}'}}\nworkers: {{count: 0}}\nlogging: {{level: WARNING}}\n"
        + HTTP.format(port=http)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", str(config)],
        cwd=workdir,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(http, 60)
        yield f"http://127.0.0.1:{http}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def latency(client: httpx.Client, url: str, requests: int) -> tuple[float, float]:
    """p50 and p99 in milliseconds of sequential GETs (after 5 unmeasured)."""
    for _ in range(5):
        client.get(url).raise_for_status()
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        client.get(url).raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
    cuts = statistics.quantiles(times, n=100)
    return statistics.median(times), cuts[98]


def api_latency(work: Path, series: int, requests: int) -> None:
    postgres = PostgresServer().start()
    try:
        backends = {
            "SQLite": f"sqlite:///{work / 'api.db'}",
            "PostgreSQL": postgres.new_database("api"),
        }
        print(f"API latency, {series} series and {series} jobs, {requests} requests (ms):")
        print("| backend | endpoint | p50 | p99 |\n|---|---|---|---|")
        for name, url in backends.items():
            fill(url, series)
            with serve(work / name, url) as base, httpx.Client(timeout=120) as client:
                for path in ("/api/v1/series", "/api/v1/status", "/metrics"):
                    p50, p99 = latency(client, base + path, requests)
                    print(f"| {name} | {path} | {p50:.1f} | {p99:.1f} |", flush=True)
    finally:
        postgres.stop()


def metrics_overhead(work: Path, runs: int) -> None:
    files = dicom_files()
    http = HTTP.format(port=free_port())
    with (
        ainode(work, 1, name="metrics off") as off,
        ainode(work, 1, extra=http, name="metrics on") as on,
    ):
        seconds: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(runs):  # alternating: both see the same disk and page cache states
            seconds["off"].append(measure(off, files, 1, 1))
            seconds["on"].append(measure(on, files, 1, 1))
    rate = {name: len(files) / statistics.median(times) for name, times in seconds.items()}
    ratio = rate["on"] / rate["off"]
    print(
        f"\nReceive, {len(files)} files, 1 association, median of {runs}: "
        f"metrics off {rate['off']:.0f} img/s, on {rate['on']:.0f} img/s, "
        f"on/off {ratio:.3f} (overhead {100 * (1 - ratio):.1f} %)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ainode-bench-api-") as tmp:
        work = Path(tmp)
        api_latency(work, args.series, args.requests)
        if dicom_files():
            metrics_overhead(work, args.runs)
        else:
            print("no ../shared/data: the receive comparison is skipped")


if __name__ == "__main__":
    main()
