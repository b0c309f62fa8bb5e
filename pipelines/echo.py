"""`echo`: records the series geometry and instance count (no AI). Lets routing, the queue
and the workers be exercised end to end."""

from __future__ import annotations

import numpy as np
import pydicom

from pipelines.base import BadInput, SeriesInput


class EchoPipeline:
    name = "echo"
    version = "1.0"

    def run(self, series: SeriesInput) -> dict[str, object]:
        if not series.files:
            raise BadInput("the series has no stored instances")
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]
        first = headers[0]
        result: dict[str, object] = {
            "series_instance_uid": series.series_instance_uid,
            "revision": series.revision,
            "instances": len(headers),
            "modality": str(first.get("Modality", "")),
            "rows": int(first.get("Rows", 0)),
            "columns": int(first.get("Columns", 0)),
        }
        if "PixelSpacing" in first:
            result["pixel_spacing_mm"] = [float(v) for v in first.PixelSpacing]
        positions = [h.ImagePositionPatient for h in headers if "ImagePositionPatient" in h]
        if "ImageOrientationPatient" in first and len(positions) == len(headers):
            row, column = np.asarray(first.ImageOrientationPatient, dtype=float).reshape(2, 3)
            along = np.sort(np.asarray(positions, dtype=float) @ np.cross(row, column))
            result["extent_mm"] = round(float(along[-1] - along[0]), 3)
            if len(along) > 1:
                result["slice_spacing_mm"] = round(float(np.median(np.diff(along))), 3)
        return result
