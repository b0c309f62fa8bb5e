"""Queue throughput (claim + complete per second) on SQLite and PostgreSQL with 1 and 4
worker processes, and the delay from series completion to job start in a running node.

    python bench/jobs.py [--jobs 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import insert, select  # noqa: E402

from node.flow.queue import JobQueue  # noqa: E402
from node.flow.routing.engine import JobRequest  # noqa: E402
from node.flow.routing.rules import Priority  # noqa: E402
from node.store.db.engine import make_engine  # noqa: E402
from node.store.db.migrate import upgrade  # noqa: E402
from node.store.db.models import Job, Series, Study, utcnow  # noqa: E402
from node.work.outcome import JobOutcome, OutcomeRecorder, ResultSummary  # noqa: E402
from tests.peers import DATA, PostgresServer, free_port, storescu, wait_until  # noqa: E402


def fill(url: str, jobs: int) -> None:
    engine = make_engine(url)
    upgrade(engine)
    now = utcnow()
    with engine.begin() as conn:
        study = conn.execute(
            insert(Study)
            .values(study_instance_uid="1.2", first_received_at=now)
            .returning(Study.id)
        ).scalar_one()
        conn.execute(
            insert(Series),
            [
                {
                    "study_id": study,
                    "series_instance_uid": f"1.2.{i + 1}",
                    "first_received_at": now,
                    "last_received_at": now,
                    "instance_count": 1,
                    "routed_revision": 0,
                    "revision": 1,
                    "state": "complete",
                }
                for i in range(jobs)
            ],
        )
        ids = conn.execute(select(Series.id)).scalars().all()
    queue = JobQueue(engine)
    request = JobRequest("x", "echo", ("origin",), Priority.ROUTINE, ("bench",))
    for series_id in ids:
        queue.enqueue(series_id, 1, [request])
    engine.dispose()


def drain(url: str, name: str) -> None:
    engine = make_engine(url)
    queue = JobQueue(engine)
    outcomes = OutcomeRecorder(engine)
    summary = ResultSummary(pipeline="echo", version="bench", positive=False)
    while (job := queue.claim(name, 30)) is not None:
        outcomes.record(JobOutcome(job.id, name, summary))
    engine.dispose()


def throughput(make_url: Callable[[], str], workers: int, jobs: int, runs: int) -> float:
    rates = []
    spawn = multiprocessing.get_context("spawn")
    for _ in range(runs):
        url = make_url()
        fill(url, jobs)
        processes = [spawn.Process(target=drain, args=(url, f"w{i}")) for i in range(workers)]
        start = time.perf_counter()
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        rates.append(jobs / (time.perf_counter() - start))
    return statistics.median(rates)


def completion_to_start(tmp: Path) -> list[float]:
    """Seconds from each real series' completion to its job's start, in `ainode serve`."""
    rules = tmp / "rules.yaml"
    rules.write_text("rules: [{name: all, match: {Modality: CT}, pipelines: [echo]}]\n")
    port = free_port()
    config = tmp / "node.yaml"
    db = tmp / "latency.db"
    config.write_text(
        f"node: {{port: {port}, host: 127.0.0.1, accept_unknown_peers: true}}\n"
        f"storage: {{path: {tmp / 'storage'}}}\ndatabase: {{url: 'sqlite:///{db}'}}\n"
        f"routing: {{rules_file: {rules}}}\nlogging: {{level: WARNING}}\n"
    )
    node = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", str(config)], cwd=REPO
    )
    try:
        import socket

        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(up, 60)
        folders = sorted(p.parent for p in DATA.rglob("*.dcm"))
        for folder in dict.fromkeys(folders):
            storescu(port, sorted(folder.glob("*.dcm")), calling_ae="BENCH")
        engine = make_engine(f"sqlite:///{db}")

        def started() -> list[float] | None:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(Series.completed_at, Job.started_at).join(
                        Job, Job.series_id == Series.id
                    )
                ).all()
            if len(rows) < len(set(folders)) or any(r.started_at is None for r in rows):
                return None
            return [(r.started_at - r.completed_at).total_seconds() for r in rows]

        delays = wait_until(started, 60, 0.2)
        engine.dispose()
        return delays
    finally:
        node.terminate()
        node.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        counter = iter(range(10_000))
        backends: dict[str, Callable[[], str]] = {
            "sqlite": lambda: f"sqlite:///{tmp}/queue{next(counter)}.db"
        }
        postgres = PostgresServer().start()
        backends["postgresql"] = lambda: postgres.new_database(f"bench{next(counter)}")
        try:
            print(f"queue throughput, {args.jobs} jobs, median of {args.runs} runs")
            print(f"{'database':<12}{'workers':>8}{'jobs/s':>9}")
            for name, make_url in backends.items():
                for workers in (1, 4):
                    rate = throughput(make_url, workers, args.jobs, args.runs)
                    print(f"{name:<12}{workers:>8}{rate:>9.0f}", flush=True)
        finally:
            postgres.stop()
        if DATA.is_dir():
            delays = completion_to_start(tmp)
            print(
                f"series completion -> job start ({len(delays)} real series): "
                f"median {statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms"
            )


if __name__ == "__main__":
    main()
