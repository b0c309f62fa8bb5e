"""lung-quant time and memory per real series, and on a 600-slice series built by stacking
real slices. Each run is its own process, so its peak RSS is its own.

    python bench/lung_quant.py [--runs 3] [--device auto|cpu|cuda] [--warm]

Prints medians of `--runs` per series: decode (load_volume), segmentation, measurement,
total, the peak resident memory of the process (Python + torch included) and the lungs'
volume (the same on every device). A run's first series pays for torch's start on the
device (CUDA's context, kernels loaded); `--warm` times a second run in the same process, as
a worker's later jobs run.
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
from typing import TYPE_CHECKING

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers import DATA, REAL_SERIES

if TYPE_CHECKING:
    from pipelines.lung_quant import LungQuantPipeline


def one(folder: Path, device: str, warm: bool) -> dict[str, float]:
    """Run lung-quant on `folder` in this process (twice if `warm`, timing the second run);
    return timings, peak RSS and the lungs' volume."""
    import torch

    from pipelines.lung_quant import LungQuantPipeline

    pipeline = LungQuantPipeline(device)  # type: ignore[arg-type]
    files = sorted(folder.glob("*.dcm"))
    if warm:
        timed(pipeline, files)
    figures = timed(pipeline, files)
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures["peak_gpu_mb"] = (
        torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    )
    return figures


def timed(pipeline: LungQuantPipeline, files: list[Path]) -> dict[str, float]:
    """One run of `pipeline` on `files`, segmenting afresh as for a new series."""
    import torch

    from pipelines import codes
    from pipelines.anatomy import shared
    from pipelines.volume import load_volume

    shared._last.clear()
    clock = time.perf_counter()
    volume = load_volume(files, requirements=pipeline.requirements)
    decode = time.perf_counter() - clock
    result = pipeline.run(volume)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {
        "slices": len(volume.sources),
        "decode": decode,
        "segmentation": result.timings["segmentation"],
        "measurement": result.timings["measurement"],
        "total": time.perf_counter() - clock,
        "lungs_ml": result.region("Both lungs").value(codes.VOLUME),
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
    parser.add_argument("--warm", action="store_true", help="time a second run per process")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.device, args.warm)))
        return
    cases = {name: folder for name, folder in REAL_SERIES.items() if any(folder.glob("*.dcm"))}
    if "covid" not in cases:
        sys.exit(f"no P001 under {DATA}")
    with tempfile.TemporaryDirectory() as tmp:
        cases["600 slices (P001 x4)"] = stacked_series(Path(tmp) / "s600", cases["covid"], 600)
        print(
            f"lung-quant, device {args.device}, medians of {args.runs} runs"
            + (", each the second run of its process" if args.warm else "")
        )
        print(
            f"{'series':<22} {'slices':>6} {'decode s':>9} {'segment s':>10} {'measure s':>10} "
            f"{'total s':>8} {'peak RSS MB':>12} {'peak GPU MB':>12} {'lungs mL':>9}"
        )
        warm = ["--warm"] if args.warm else []
        for name, folder in cases.items():
            runs = [
                json.loads(
                    subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--one",
                            str(folder),
                            "--device",
                            args.device,
                            *warm,
                        ],
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
                f"{median('peak_gpu_mb'):>12.0f} {median('lungs_ml'):>9.0f}"
            )


if __name__ == "__main__":
    main()
