"""`echo`: loads the volume and reports its geometry, no AI. A quick end-to-end check of
receiving, routing, the queue and volume loading."""

from __future__ import annotations

from pipelines import codes
from pipelines.availability import ECHO
from pipelines.base import Requirements, Stage
from pipelines.context import Context, Need
from pipelines.result import Measurement, PipelineResult, Region
from pipelines.volume import Volume


class EchoPipeline:
    name = "echo"
    version = ECHO.version
    requirements = Requirements(modalities=("CT",), min_slices=3)
    needs: frozenset[Need] = frozenset()

    def problem(self) -> str | None:
        return ECHO.problem

    def run(self, volume: Volume, context: Context | Stage | None = None) -> PipelineResult:
        slices = volume.voxels.shape[0]
        spacing = volume.spacing[0]
        geometry = (
            Measurement(codes.SLICES, float(slices), codes.NO_UNITS),
            Measurement(codes.SLICE_SPACING, round(spacing, 3), codes.MILLIMETER),
            Measurement(codes.EXTENT, round(spacing * (slices - 1), 3), codes.MILLIMETER),
        )
        return PipelineResult(
            self.name, self.version, regions=[Region("Scan", codes.CHEST, geometry)]
        )
