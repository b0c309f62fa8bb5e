"""Query/retrieve served by the node and by Orthanc, measured in the same run: C-FIND latency
over a catalog of N series (one small CT instance each, sent to both over DIMSE), and C-MOVE
throughput of a real chest CT series (COVID-CT-MD, JPEG Lossless) to a DCMTK storescp that
takes every syntax (the instances go as stored).

    python bench/qr.py [--series 10000] [--runs 20] [--moves 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    StudyRootQueryRetrieveInformationModelFind as FIND,
)
from pynetdicom.sop_class import (  # noqa: E402
    StudyRootQueryRetrieveInformationModelMove as MOVE,
)

from bench.ingest import wait_until_settled  # noqa: E402
from tests.node.edge.test_scp import ct_dataset  # noqa: E402
from tests.peers import (  # noqa: E402
    DCMTK_ENV,
    REAL_SERIES,
    NodeProcess,
    OrthancServer,
    dcmtk,
    free_port,
    node_settings,
    storescp,
)

NAMES = ["DOE^JANE", "DOE^JOHN", "ROE^RICHARD", "MUSTERMANN^ERIKA", "ROSSI^MARIO"]
SERIES_PER_STUDY = 4


def catalog(folder: Path, series: int) -> tuple[str, str]:
    """`series` one-instance CT series, 4 per study; a patient ID and a study UID in it."""
    folder.mkdir()
    studies = series // SERIES_PER_STUDY
    for number in range(studies):
        study = generate_uid()
        for index in range(SERIES_PER_STUDY):
            ds = ct_dataset(generate_uid(), study)
            ds.PatientName = NAMES[number % len(NAMES)]
            ds.PatientID = f"P{number % 1000:04d}"
            ds.StudyDate = f"20{20 + number % 5}{1 + number % 12:02d}{1 + number % 28:02d}"
            ds.SeriesNumber = index + 1
            ds.save_as(folder / f"{number}-{index}.dcm", enforce_file_format=True)
    return "P0007", study


def send(port: int, called: str, folder: Path) -> None:
    subprocess.run(
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", called, "+sd", "+r", "-R", "-xs",
         "127.0.0.1", str(port), str(folder)],
        env=DCMTK_ENV, check=True, capture_output=True, timeout=3600,
    )  # fmt: skip


@contextmanager
def targets(work: Path, dest_port: int) -> Iterator[tuple[dict[str, tuple[int, str]], int]]:
    """The node and Orthanc, each knowing BENCH (may find and move) and DEST; the node's pid."""
    node_port = free_port()
    orthanc = OrthancServer(work / "orthanc", node_port).start()
    for name, port in (("BENCH", 1), ("DEST", dest_port)):
        response = httpx.put(
            f"{orthanc.url}/modalities/{name}",
            json={"AET": name, "Host": "127.0.0.1", "Port": port},
        )
        response.raise_for_status()
    home = work / "node"
    home.mkdir()
    peers = {
        "bench": {"ae_title": "BENCH", "host": "127.0.0.1", "port": 1, "allow": ["find", "move"]},
        "dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest_port},
        "modality": {"ae_title": "STORESCU", "host": "127.0.0.1", "port": 104},
    }
    settings = node_settings(
        home, node_port, f"sqlite:///{home / 'ainode.db'}", peers=peers,
        workers={"count": 0}, logging={"level": "WARNING"},
    )  # fmt: skip
    node = NodeProcess(home, node_port, settings).start()
    assert node.proc is not None
    try:
        found = {"ainode": (node_port, "AINODE"), "orthanc": (orthanc.dicom_port, "ORTHANC")}
        yield found, node.proc.pid
    finally:
        node.stop()
        orthanc.stop()


def find_seconds(port: int, called: str, query: Dataset, runs: int) -> tuple[list[float], int]:
    """Each run's seconds from C-FIND-RQ to the final response, and the matches."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    times, matches = [], 0
    try:
        for _ in range(runs):
            started = time.perf_counter()
            answers = [status for status, _ in assoc.send_c_find(query, FIND)]
            times.append(time.perf_counter() - started)
            matches = len(answers) - 1
    finally:
        assoc.release()
    return times, matches


def move_seconds(port: int, called: str, study: str, out: Path) -> tuple[float, int]:
    for old in out.iterdir():
        old.unlink()
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    try:
        started = time.perf_counter()
        final = [status for status, _ in assoc.send_c_move(query, "DEST", MOVE)][-1]
        elapsed = time.perf_counter() - started
    finally:
        assoc.release()
    if int(final.Status) != 0:
        raise RuntimeError(f"{called}: C-MOVE ended with 0x{int(final.Status):04X}")
    return elapsed, len(list(out.iterdir()))


def queries(patient: str, study: str) -> dict[str, Dataset]:
    def query(level: str, **keys: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate"):
            setattr(ds, keyword, "")
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        return ds

    return {
        "study by PatientID": query("STUDY", PatientID=patient),
        "study by name wildcard (1/5 of all)": query("STUDY", PatientName="doe^ja*"),
        "study by date range (1 month)": query("STUDY", StudyDate="20220301-20220331"),
        "series of one study": query("SERIES", StudyInstanceUID=study, SeriesInstanceUID=""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--moves", type=int, default=3)
    args = parser.parse_args()
    real = REAL_SERIES["covid"]
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        patient, study = catalog(work / "catalog", args.series)
        dest_port = free_port()
        out = work / "dest"
        with storescp(dest_port, out, "+B", "+xa"), targets(work, dest_port) as (found, pid):
            for name, (port, called) in found.items():
                started = time.perf_counter()
                send(port, called, work / "catalog")
                seconds = time.perf_counter() - started
                print(f"{name}: {args.series} series stored in {seconds:.1f} s")
            wait_until_settled(pid, timeout=900)  # the node routed what it received
            print(f"\nC-FIND over {args.series} series, median (p95) of {args.runs} runs, ms")
            print(f"{'query':40} {'matches':>7} {'ainode':>14} {'orthanc':>14} {'ratio':>6}")
            for label, query in queries(patient, study).items():
                figures = {}
                for name, (port, called) in found.items():
                    times, matches = find_seconds(port, called, query, args.runs)
                    times.sort()
                    figures[name] = (statistics.median(times), times[int(0.95 * (len(times) - 1))])
                node, orthanc = figures["ainode"], figures["orthanc"]
                print(
                    f"{label:40} {matches:>7} {node[0] * 1e3:>6.1f} ({node[1] * 1e3:>5.1f})"
                    f" {orthanc[0] * 1e3:>6.1f} ({orthanc[1] * 1e3:>5.1f})"
                    f" {orthanc[0] / node[0]:>5.2f}x"
                )
            if not real.exists():
                print("\nC-MOVE: skipped (no ../shared/data)")
                return
            series = work / "real"
            shutil.copytree(real, series)
            moved_study = _study_of(series)
            for port, called in found.values():
                send(port, called, series)
            print(f"\nC-MOVE of a real series ({len(list(series.glob('*.dcm')))} slices) to "
                  f"storescp, median of {args.moves}")  # fmt: skip
            rates = {}
            for name, (port, called) in found.items():
                runs = [move_seconds(port, called, moved_study, out) for _ in range(args.moves)]
                seconds = statistics.median(elapsed for elapsed, _ in runs)
                count = runs[-1][1]
                rates[name] = count / seconds
                print(f"{name:10} {count} instances in {seconds:.2f} s: {rates[name]:.0f}/s")
            print(f"ainode / orthanc: {rates['ainode'] / rates['orthanc']:.2f}x")


def _study_of(folder: Path) -> str:
    import pydicom

    first = next(iter(sorted(folder.glob("*.dcm"))))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


if __name__ == "__main__":
    main()
