"""Remote workers at scale: N simulated workers (threads with their own HTTP sessions) claim jobs
over the worker API of a running node on PostgreSQL, "run" each for a fixed time, and record an
empty result; printed per N: jobs done per second, claims per second, claim latency p50/p99,
and the CPU the node's HTTP process, its coordinator (main process) and PostgreSQL used.

    python bench/scale.py [--workers 1,2,4,8,16,32] [--seconds 15] [--work-seconds 0.2]
                          [--http-processes 1,2]

One table per `http.processes` value, each from a node started afresh on the same queue.

The simulated workers share this machine's cores with the node: at large N the table shows
where the machine, not only the node, saturates (the client threads' CPU is printed too).
PostgreSQL is the test server (fsync off). One study per job, as a CT day mostly is.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import insert, select  # noqa: E402

from node.flow.queue import JobQueue  # noqa: E402
from node.flow.routing.engine import JobRequest  # noqa: E402
from node.flow.routing.rules import Priority  # noqa: E402
from node.store.db.engine import make_engine  # noqa: E402
from node.store.db.migrate import upgrade  # noqa: E402
from node.store.db.models import Series, Study, utcnow  # noqa: E402
from tests.peers import NodeProcess, PostgresServer, free_port, node_settings  # noqa: E402

TOKEN = "bench-worker-secret"
SUMMARY = {"pipeline": "echo", "version": "bench", "positive": False}


def fill(url: str, jobs: int) -> None:
    """`jobs` queued echo jobs, each of its own study's series."""
    engine = make_engine(url)
    upgrade(engine)
    now = utcnow()
    with engine.begin() as conn:
        studies = conn.execute(
            insert(Study).returning(Study.id),
            [
                {
                    "study_instance_uid": f"1.2.{i + 1}",
                    "first_received_at": now,
                    "state": "complete",  # nothing left for the coordinator to do
                    "completed_at": now,
                }
                for i in range(jobs)
            ],
        ).scalars()
        conn.execute(
            insert(Series),
            [
                {
                    "study_id": study,
                    "series_instance_uid": f"1.2.{i + 1}.1",
                    "first_received_at": now,
                    "last_received_at": now,
                    "instance_count": 0,
                    "routed_revision": 1,  # routed: its job is queued
                    "revision": 1,
                    "state": "complete",
                }
                for i, study in enumerate(studies)
            ],
        )
        ids = conn.execute(select(Series.id)).scalars().all()
    queue = JobQueue(engine)
    request = JobRequest("x", "echo", (), Priority.ROUTINE, ("bench",))
    for series_id in ids:
        queue.enqueue(series_id, 1, [request])
    engine.dispose()


class Simulated(threading.Thread):
    """A remote worker whose pipeline sleeps `work_seconds`."""

    def __init__(self, url: str, name: str, work_seconds: float, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.name, self.work_seconds, self.stop = url, name, work_seconds, stop
        self.latencies: list[float] = []
        self.done = 0

    def run(self) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        params = {"worker": self.name}
        claim = {"worker": self.name, "pipelines": ["echo"], "device": "simulated"}
        while not self.stop.is_set():
            started = time.perf_counter()
            answer = session.post(f"{self.url}/api/v1/worker/claim", json=claim, timeout=60)
            self.latencies.append(time.perf_counter() - started)
            if answer.status_code != 200:
                self.stop.wait(0.5)  # the pool ran dry
                continue
            job = answer.json()["job"]
            time.sleep(self.work_seconds)
            result = {"summary": SUMMARY, "objects": []}
            url = f"{self.url}/api/v1/worker/jobs/{job}/result"
            if session.post(url, params=params, json=result, timeout=60).status_code == 200:
                self.done += 1


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def postgres_pids(server: PostgresServer) -> list[int]:
    """The postmaster and its backends."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == postmaster:
            children.append(int(stat.parent.name))
    return [postmaster, *children]


def step(
    node: NodeProcess, postgres: PostgresServer, url: str, count: int, seconds: float, work: float
) -> dict[str, float]:
    processes = {p["name"]: p["pid"] for p in node.status()["processes"]}
    stop = threading.Event()
    workers = [Simulated(url, f"sim-{count}-{i}", work, stop) for i in range(count)]
    watched = {
        "http": [pid for name, pid in processes.items() if name.startswith("http")],
        "main": [processes["main"]],
    }
    before = {name: cpu_seconds(pids) for name, pids in watched.items()}
    database_before = {pid: cpu_seconds([pid]) for pid in postgres_pids(postgres)}
    client_before = time.process_time()
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    latencies = sorted(x for worker in workers for x in worker.latencies)
    return {
        "jobs_s": sum(w.done for w in workers) / elapsed,
        "claims_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        **{
            f"{name}_cpu": (cpu_seconds(pids) - before[name]) / elapsed
            for name, pids in watched.items()
        },
        "postgres_cpu": sum(
            cpu_seconds([pid]) - database_before.get(pid, 0.0) for pid in postgres_pids(postgres)
        )
        / elapsed,
        "client_cpu": (time.process_time() - client_before) / elapsed,
    }


def table(
    home: Path,
    url: str,
    processes: int,
    counts: list[int],
    args: argparse.Namespace,
    postgres: PostgresServer,
) -> None:
    """One node with `processes` HTTP processes; a row per number of simulated workers."""
    home.mkdir()
    http_port = free_port()
    token = {
        "name": "bench",
        "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
        "roles": ["worker"],
    }
    http = {"host": "127.0.0.1", "port": http_port, "processes": processes,
            "auth": {"tokens": [token]}}  # fmt: skip
    settings = node_settings(
        home, free_port(), url, workers={"count": 0, "lease_seconds": 60}, http=http,
        logging={"level": "WARNING"},
    )  # fmt: skip
    node = NodeProcess(home, settings["node"]["port"], settings).start()
    base = f"http://127.0.0.1:{http_port}"
    print(f"http.processes: {processes}")
    print(
        f"{'N':>3} {'jobs/s':>8} {'claims/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'http CPU':>9} {'main CPU':>9} {'pg CPU':>7} {'client CPU':>11}"
    )
    for count in counts:
        row = step(node, postgres, base, count, args.seconds, args.work_seconds)
        print(
            f"{count:>3} {row['jobs_s']:>8.1f} {row['claims_s']:>9.1f} {row['p50_ms']:>8.1f} "
            f"{row['p99_ms']:>8.1f} {row['http_cpu']:>9.2f} {row['main_cpu']:>9.2f} "
            f"{row['postgres_cpu']:>7.2f} "
            f"{row['client_cpu']:>11.2f}",
            flush=True,
        )
    node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8,16,32")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--work-seconds", type=float, default=0.2)
    parser.add_argument("--jobs", type=int, default=8000)
    parser.add_argument("--http-processes", default="1,2")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    postgres = PostgresServer().start()
    home = Path(tempfile.mkdtemp(prefix="ainode-scale-"))
    try:
        url = postgres.new_database("scale")
        print(f"queueing {args.jobs} jobs ...", flush=True)
        fill(url, args.jobs)
        for index, processes in enumerate(int(n) for n in args.http_processes.split(",")):
            table(home / f"node-{index}", url, processes, counts, args, postgres)
    finally:
        postgres.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
