"""`ainode run`: a pipeline on a folder of DICOM files, without the service.

Files are grouped by series; each series is loaded, checked and processed exactly as a
worker would, and its result written to `OUTPUT/<SeriesInstanceUID>/`: result.json, masks.npz,
and the DICOM objects (seg.dcm, sr.dcm, key images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from node.work.inference import ResultTarget, process_series
from pipelines.base import BadInput, Pipeline, Unavailable
from pipelines.context import Context
from pipelines.result import PipelineResult
from pipelines.volume import Progress, VolumeOptions


@dataclass
class OfflineRun:
    series_instance_uid: str
    files: int
    output: Path | None = None
    result: PipelineResult | None = None
    error: str | None = None


def find_series(folder: Path) -> dict[str, list[Path]]:
    """DICOM files under `folder` (any name, any depth) by Series Instance UID."""
    series: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError):
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid:
            series.setdefault(uid, []).append(path)
    return series


def run_series(
    pipeline: Pipeline,
    uid: str,
    files: list[Path],
    output: Path,
    options: VolumeOptions,
    decoded: Progress,
    stage: Callable[[str], None],
    station: str = "AINODE",
) -> OfflineRun:
    run = OfflineRun(uid, len(files))
    try:
        target = ResultTarget(1, station, lambda volume: output / uid)
        done = process_series(
            pipeline, files, options, target, Context.of(pipeline, stage), decoded
        )
    except (BadInput, Unavailable) as exc:
        run.error = str(exc)
        return run
    run.output, run.result = done.folder, done.result
    return run
