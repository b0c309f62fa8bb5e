"""`ainode run`: a pipeline on a folder of DICOM files, without the service.

Files are grouped by series; each series is loaded, checked and processed exactly as a
worker would, and its result written to `OUTPUT/<SeriesInstanceUID>/`: result.json, masks.npz,
and the DICOM objects (seg.dcm, sr.dcm).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from node.results.encode import encode_result
from node.results.identity import ResultIdentity
from pipelines.base import BadInput, Pipeline, Unavailable
from pipelines.result import PipelineResult
from pipelines.volume import Progress, VolumeOptions, load_volume


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
        problem = pipeline.problem()
        if problem:
            raise Unavailable(problem)
        stage("decode")
        clock = time.perf_counter()
        volume = load_volume(files, options, pipeline.requirements, decoded)
        loaded = time.perf_counter() - clock
        result = pipeline.run(volume, stage)
    except (BadInput, Unavailable) as exc:
        run.error = str(exc)
        return run
    result.timings = {"load": loaded, **result.timings}
    run.output = output / uid
    stage("encode")
    identity = ResultIdentity(pipeline.name, pipeline.version, uid, 1, station)
    clock = time.perf_counter()
    encode_result(result, volume, identity, run.output)
    result.timings["encoding"] = time.perf_counter() - clock
    result.save(run.output)
    run.result = result
    return run
