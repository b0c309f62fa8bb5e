"""One pipeline run on one series: check, load, infer, encode, save. The worker and
`ainode run` both go through here, so a result is the same whichever way it was made."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.work.guard import GuardScore
from node.work.results.encode import encode_result
from node.work.results.identity import ResultIdentity
from node.work.siblings import Reconstruction
from pipelines.base import BadInput, Pipeline, Stage, Unavailable
from pipelines.context import Context
from pipelines.result import PipelineResult
from pipelines.volume import FrameReader, Progress, Volume, VolumeOptions, load_volume


@dataclass(frozen=True)
class ResultTarget:
    """Where a job's result is written and what it says of itself: the series revision it
    was made from, the node's AE title (its Station Name), the folder for a volume, the
    series' input-guard score and the acquisition's other reconstructions, which the SR
    reports."""

    revision: int
    station: str
    folder_for: Callable[[Volume], Path]
    guard: GuardScore | None = None
    siblings: tuple[Reconstruction, ...] = ()


@dataclass
class Processed:
    volume: Volume
    result: PipelineResult
    folder: Path
    objects: list[Path]


def process_series(
    pipeline: Pipeline,
    files: Sequence[Path],
    options: VolumeOptions,
    target: ResultTarget,
    context: Context,
    decoded: Progress | None = None,
    frames: FrameReader | None = None,
) -> Processed:
    """Run `pipeline` on the series in `files` and write its result (result.json, masks.npz,
    SEG, SR, key images) to `target.folder_for(volume)`. Raises BadInput or Unavailable."""
    loaded = load_series(pipeline, files, options, context, decoded, frames)
    result = pipeline.run(loaded.volume, context)
    return finish_series(pipeline, loaded, result, target, context)


@dataclass
class Loaded:
    volume: Volume
    seconds: float


def load_series(
    pipeline: Pipeline,
    files: Sequence[Path],
    options: VolumeOptions,
    stage: Stage,
    decoded: Progress | None = None,
    frames: FrameReader | None = None,
) -> Loaded:
    """The series in `files` as the pipeline wants it (`frames`: where decoded pixels come
    from, the files themselves by default); raises BadInput or Unavailable."""
    problem = pipeline.problem()
    if problem:
        raise Unavailable(problem)
    if not files:
        raise BadInput("the series has no stored instances")
    stage("decode")
    clock = time.perf_counter()
    volume = load_volume(files, options, pipeline.requirements, decoded, frames)
    return Loaded(volume, time.perf_counter() - clock)


def finish_series(
    pipeline: Pipeline,
    loaded: Loaded,
    result: PipelineResult,
    target: ResultTarget,
    stage: Stage,
) -> Processed:
    """Check `result` against the loaded series, encode it as DICOM and save it to
    `target.folder_for(volume)`; ValueError when the pipeline returned something
    inconsistent."""
    volume = loaded.volume
    result.check()
    for mask in result.masks:
        if mask.array.shape != volume.voxels.shape:
            raise ValueError(
                f"{pipeline.name}: mask {mask.segment.label!r} of shape {mask.array.shape} "
                f"on a volume of {volume.voxels.shape}"
            )
    result.timings = {"load": loaded.seconds, **result.timings}
    stage("encode")
    folder = target.folder_for(volume)
    identity = ResultIdentity(
        pipeline.name, pipeline.version, volume.series_instance_uid, target.revision, target.station
    )
    clock = time.perf_counter()
    objects = encode_result(result, volume, identity, folder, target.guard, target.siblings)
    result.timings["encoding"] = time.perf_counter() - clock
    result.save(folder)
    return Processed(volume, result, folder, objects)
