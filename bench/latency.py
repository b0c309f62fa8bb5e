"""End-to-end latency: a modality (DCMTK storescu) sends a real series to `ainode serve`, and
the SR of lung-quant is stored in the PACS (Orthanc). Measured from the moment storescu has
sent the last instance and released the association, to the moment Orthanc lists the SR, on
a running node: each node first handles a series of another study (A0001's body kernel; for
A0001's own series, normal001), so its worker has loaded its pipelines, as in a hospital.

    python bench/latency.py [--runs 3] [--series covid]

Prints, per real series, with the worker decoding CT series as they arrive (the default) and
without (`workers.prefetch_mb: 0`), runs alternating, the median of `--runs` and its
breakdown from the node's own
records: completion wait (last instance -> series complete), queue (complete -> job start),
load (decode), segmentation, measurement, encoding (SEG + SR), sending (job end -> dispatch
stored), and the rest (polling, bookkeeping).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from node.work.results.files import SR_FILE  # noqa: E402
from tests.peers import (  # noqa: E402
    DATA,
    REAL_SERIES,
    NodeProcess,
    OrthancServer,
    free_port,
    node_settings,
    storescu,
    wait_until,
)

RULES = """
rules:
  - name: chest-ct
    match: {Modality: CT}
    pipelines: [lung-quant]
    destinations: [pacs]
"""
PREFETCH_MB = 1024
"""The default `workers.prefetch_mb`: decoded while arriving."""
STAGES = ("completion", "queue", "load", "segmentation", "measurement", "encoding", "sending")


def seconds(later: str, earlier: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def one_run(
    home: Path, files: list[Path], warm_up: list[Path], prefetch_mb: int
) -> dict[str, float]:
    home.mkdir(parents=True)
    node_port = free_port()
    orthanc = OrthancServer(home / "orthanc", node_port).start()
    rules = home / "rules.yaml"
    rules.write_text(RULES)
    settings = node_settings(
        home,
        node_port,
        f"sqlite:///{home / 'ainode.db'}",
        routing={"rules_file": str(rules)},
        peers={
            "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
            "modality": {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 104},
        },
        logging={"level": "WARNING"},
        workers={"count": 1, "prefetch_mb": prefetch_mb},
    )
    node = NodeProcess(home, node_port, settings).start()
    try:
        warm_up_study, study = study_of(warm_up), study_of(files)  # not a file read a poll
        storescu(node_port, warm_up)
        wait_until(lambda: sr_stored(orthanc, warm_up_study), timeout=300, interval=0.05)
        storescu(node_port, files)
        sent = time.perf_counter()
        wait_until(lambda: sr_written(node.storage, study), timeout=300, interval=0.05)
        wait_until(lambda: sr_stored(orthanc, study), timeout=300, interval=0.05)
        total = time.perf_counter() - sent
        status = node.status()
    finally:
        node.stop()
        orthanc.stop()
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    (series,) = [s for s in status["series"] if s["series_instance_uid"] == series_uid]
    (job,) = [j for j in status["jobs"] if j["series_instance_uid"] == series_uid]
    (dispatch,) = [d for d in status["dispatches"] if d["job_id"] == job["id"]]
    timings = job["result"]["timings_s"]
    stages = {
        "completion": seconds(series["completed_at"], series["last_received_at"]),
        "queue": seconds(job["started_at"], series["completed_at"]),
        "load": timings["load"],
        "segmentation": timings["segmentation"],
        "measurement": timings["measurement"],
        "encoding": timings["encoding"],
        "sending": seconds(dispatch["finished_at"], job["finished_at"]),
    }
    return {"total": total, **stages}


def study_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def sr_written(storage: Path, study_uid: str) -> bool:
    """Whether the worker has written an SR of the study: a look at a folder, where asking
    Orthanc 20 times a second through the whole job would take CPU from the node measured."""
    return any((storage / study_uid / "results").rglob(SR_FILE))


def sr_stored(orthanc: OrthancServer, study_uid: str) -> bool:
    """Whether Orthanc holds an SR in the study (the node's, the study's own has none)."""
    studies = [
        study["ID"]
        for study in orthanc.get("/studies?expand")
        if study["MainDicomTags"].get("StudyInstanceUID") == study_uid
    ]
    return bool(studies) and any(
        s["MainDicomTags"].get("Modality") == "SR"
        for s in orthanc.get(f"/studies/{studies[0]}/series")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--series", nargs="*", choices=sorted(REAL_SERIES), help="default: all")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"no data at {DATA}")
    print(f"send -> SR stored in Orthanc, lung-quant on the CPU, medians of {args.runs} runs (s)")
    print(
        f"{'series':<18} {'slices':>6} {'ahead':>5} {'total':>6} "
        + " ".join(f"{s:>12}" for s in STAGES)
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.series or REAL_SERIES:
            files = sorted(REAL_SERIES[name].glob("*.dcm"))
            other = "normal" if name.endswith("kernel") else "body-kernel"  # another study
            warm_up = sorted(REAL_SERIES[other].glob("*.dcm"))
            runs: dict[int, list[dict[str, float]]] = {0: [], PREFETCH_MB: []}
            for i in range(args.runs):
                for prefetch_mb, done in runs.items():
                    home = Path(tmp) / f"{name}-{prefetch_mb}-{i}".replace(" ", "_")
                    done.append(one_run(home, files, warm_up, prefetch_mb))
            for prefetch_mb, done in runs.items():
                medians = {k: statistics.median(r[k] for r in done) for k in done[0]}
                print(
                    f"{name:<18} {len(files):>6} {'yes' if prefetch_mb else 'no':>5} "
                    f"{medians['total']:>6.2f} " + " ".join(f"{medians[s]:>12.2f}" for s in STAGES)
                )


if __name__ == "__main__":
    main()
