"""lung-quant time and memory per real series, and on a 600-slice series built by stacking
real slices. Each run is its own process, so its peak RSS is its own.

    python bench/lung_quant.py [--runs 3] [--device auto|cpu|cuda]

Prints medians of `--runs` per series: decode (load_volume), segmentation, measurement,
total, and the peak resident memory of the process (Python + torch included).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers import DATA, REAL_SERIES


def one(folder: Path, device: str) -> dict[str, float]:
    """Run lung-quant once on `folder` in this process; return timings and peak RSS."""
    import torch

    from pipelines.lung_quant import LungQuantPipeline
    from pipelines.volume import load_volume

    pipeline = LungQuantPipeline(device)  # type: ignore[arg-type]
    files = sorted(folder.glob("*.dcm"))
    clock = time.perf_counter()
    volume = load_volume(files, requirements=pipeline.requirements)
    decode = time.perf_counter() - clock
    result = pipeline.run(volume)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    total = time.perf_counter() - clock
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {
        "slices": len(volume.sources),
        "decode": decode,
        "segmentation": result.timings["segmentation"],
        "measurement": result.timings["measurement"],
        "total": total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": peak_gpu,
    }


def stacked_series(target: Path, source: Path, slices: int) -> Path:
    """A `slices`-slice series from the real slices of `source`, repeated along z."""
    files = sorted(source.glob("*.dcm"))
    headers = sorted(
        (pydicom.dcmread(f) for f in files), key=lambda ds: float(ds.ImagePositionPatient[2])
    )
    first = float(headers[0].ImagePositionPatient[2])
    step = float(headers[1].ImagePositionPatient[2]) - first
    series_uid = generate_uid()
    target.mkdir(parents=True, exist_ok=True)
    for k in range(slices):
        ds = headers[k % len(headers)]
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, first + k * step]
        ds.save_as(target / f"{k:04d}.dcm")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.device)))
        return
    if not DATA.is_dir():
        sys.exit(f"no data at {DATA}")
    with tempfile.TemporaryDirectory() as tmp:
        cases = dict(REAL_SERIES)
        cases["600 slices (P001 x4)"] = stacked_series(
            Path(tmp) / "s600", REAL_SERIES["covid"], 600
        )
        print(f"lung-quant, device {args.device}, medians of {args.runs} runs")
        print(
            f"{'series':<22} {'slices':>6} {'decode s':>9} {'segment s':>10} {'measure s':>10} "
            f"{'total s':>8} {'peak RSS MB':>12} {'peak GPU MB':>12}"
        )
        for name, folder in cases.items():
            runs = [
                json.loads(
                    subprocess.run(
                        [sys.executable, __file__, "--one", str(folder), "--device", args.device],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout.splitlines()[-1]
                )
                for _ in range(args.runs)
            ]

            def median(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            print(
                f"{name:<22} {int(median('slices')):>6} {median('decode'):>9.2f} "
                f"{median('segmentation'):>10.2f} {median('measurement'):>10.2f} "
                f"{median('total'):>8.2f} {median('peak_rss_mb'):>12.0f} "
                f"{median('peak_gpu_mb'):>12.0f}"
            )


if __name__ == "__main__":
    main()
