"""What a job hands its pipeline beside the volume, `run(volume, context)`: where to report
the stages it enters, and the anatomy it declared it needs (`Pipeline.needs`), segmented once
per series and shared with the series' other pipelines (`pipelines.anatomy.shared`).

A context is also a `Stage` (calling it reports a stage), so a pipeline written for
`run(volume, stage)` runs unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import torch

from pipelines.anatomy.shared import Anatomy
from pipelines.base import Stage

if TYPE_CHECKING:
    from pipelines.anatomy.lungs import Lungs
    from pipelines.base import Pipeline
    from pipelines.volume import Volume


class Need(StrEnum):
    """What a pipeline may ask its context for, once it has declared it."""

    LUNGS = "lungs"
    """lung-quant's left and right lungs, airway and aerated tissue (`Lungs`)."""


def _quiet(_: str) -> None:
    return None


@dataclass
class Context:
    """One job's (or one batch's) context for one pipeline."""

    pipeline: str
    needs: frozenset[Need] = frozenset()
    stage: Stage = _quiet
    anatomy: Anatomy = field(default_factory=Anatomy)

    @classmethod
    def of(
        cls, pipeline: Pipeline, stage: Stage | None = None, anatomy: Anatomy | None = None
    ) -> Context:
        """The context `pipeline` runs in; a fresh `Anatomy` (memory only) when none is shared."""
        return cls(pipeline.name, needs_of(pipeline), stage or _quiet, anatomy or Anatomy())

    def __call__(self, label: str) -> None:
        self.stage(label)

    def lungs(self, volume: Volume, device: torch.device | None = None) -> Lungs:
        """The volume's lungs (segmented once: BadInput when it has none); LookupError for a
        pipeline that did not declare `Need.LUNGS`."""
        if Need.LUNGS not in self.needs:
            raise LookupError(
                f"pipeline {self.pipeline} asked for lungs without declaring it needs them"
            )
        return self.anatomy.lungs(volume, device)


def needs_of(pipeline: Pipeline) -> frozenset[Need]:
    """What the pipeline declared it needs (none, for a pipeline that declares nothing)."""
    return frozenset(getattr(pipeline, "needs", frozenset()))


def context_for(pipeline: Pipeline, given: Context | Stage | None) -> Context:
    """The context given, or one made for a caller that passed a bare stage callback or none."""
    if isinstance(given, Context):
        return given
    return Context.of(pipeline, given)
