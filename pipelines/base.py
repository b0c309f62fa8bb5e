"""What every pipeline is: a name, a version, its requirements, what it needs from its context,
and `run(volume, context) -> result`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pipelines.context import Context
    from pipelines.result import PipelineResult
    from pipelines.volume import Volume


DevicePreference = Literal["auto", "cuda", "cpu"]


class BadInput(Exception):
    """The series cannot be processed by this pipeline; retrying will not help."""


class Unavailable(Exception):
    """The pipeline cannot run on this node (missing or corrupt model); no job can succeed."""


@dataclass(frozen=True)
class Requirements:
    """What a series must be for a pipeline to accept it, checked on headers before decoding."""

    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = 3
    max_slice_thickness_mm: float | None = None
    body_parts: tuple[str, ...] = ()
    min_coverage_mm: float | None = None


Stage = Callable[[str], None]
"""Called with the name of each stage a pipeline enters (for progress bars and timings)."""


@dataclass
class StageTimer:
    """Announces each stage to a `Stage` callback and records how long it took."""

    stage: Stage
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, key: str, label: str | None = None) -> Iterator[None]:
        self.stage(label or key)
        clock = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = time.perf_counter() - clock


class Pipeline(Protocol):
    name: str
    version: str
    requirements: Requirements
    # optional: `needs: frozenset[Need]`, what it asks its `Context` for (the lungs); a context
    # refuses what was not declared (`pipelines.context.needs_of`)

    def problem(self) -> str | None:
        """Why the pipeline cannot run here (e.g. its weights are missing), else None."""
        ...

    def run(self, volume: Volume, context: Context | Stage | None = None) -> PipelineResult:
        """Process the volume; raise BadInput for input it cannot handle. `context`: the
        job's (`pipelines.context`); a bare stage callback or none gets a context of its own."""
        ...


@runtime_checkable
class BatchedPipeline(Pipeline, Protocol):
    """A pipeline that runs several series through its network at once."""

    def batch_limit(self) -> int:
        """How many waiting series a worker may hand over in one call now."""
        ...

    def run_batch(
        self, volumes: list[Volume], context: Context | Stage | None = None
    ) -> list[PipelineResult]:
        """`run` of each volume, in order, computed together."""
        ...
