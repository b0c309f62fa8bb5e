"""What a pipeline returns: masks with coded segments, measurements per region, findings and
detections. Encoders (SR, SEG) read this; nothing here writes DICOM.

Masks lie on the volume's voxel grid (slice, row, column), in the volume's slice order.
Coordinates are DICOM patient coordinates (LPS, mm).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.codes import Code

RESULT_FILE = "result.json"
MASKS_FILE = "masks.npz"


@dataclass(frozen=True)
class Segment:
    """A coded segment definition, as a DICOM SEG segment needs it."""

    label: str
    category: Code
    type: Code
    anatomic_region: Code | None = None
    color_rgb: tuple[int, int, int] = (255, 255, 0)

    def as_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "category": self.category.as_json(),
            "type": self.type.as_json(),
            "anatomic_region": self.anatomic_region.as_json() if self.anatomic_region else None,
            "color_rgb": list(self.color_rgb),
        }


@dataclass
class Mask:
    segment: Segment
    array: np.ndarray


@dataclass(frozen=True)
class Measurement:
    concept: Code
    value: float
    unit: Code

    def as_json(self) -> dict[str, object]:
        return {"concept": self.concept.as_json(), "value": self.value, "unit": self.unit.value}


@dataclass(frozen=True)
class Region:
    """One measurement group: a region (with its segment when there is a mask) and its values.
    `spans` names the masks a region without its own segment covers (e.g. both lungs)."""

    name: str
    finding_site: Code
    measurements: tuple[Measurement, ...]
    segment: str | None = None
    spans: tuple[str, ...] = ()

    def value(self, concept: Code) -> float:
        return next(m.value for m in self.measurements if m.concept == concept)

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "finding_site": self.finding_site.as_json(),
            "segment": self.segment,
            "measurements": [m.as_json() for m in self.measurements],
        }


@dataclass(frozen=True)
class Finding:
    """A classifier's output for one label: its probability and the decision at its threshold."""

    concept: Code
    probability: float
    present: bool

    def as_json(self) -> dict[str, object]:
        return {
            "concept": self.concept.as_json(),
            "probability": self.probability,
            "present": self.present,
        }


@dataclass(frozen=True)
class Detection:
    """A detected object: its box in patient coordinates (mm) and its score."""

    label: Code
    score: float
    box_min: tuple[float, float, float]
    box_max: tuple[float, float, float]

    def as_json(self) -> dict[str, object]:
        return {
            "label": self.label.as_json(),
            "score": self.score,
            "box_min_mm": list(self.box_min),
            "box_max_mm": list(self.box_max),
        }


@dataclass(frozen=True)
class SliceProfile:
    """A value per slice of the volume, in volume slice order (e.g. % high attenuation)."""

    name: str
    unit: Code
    values: tuple[float, ...]


@dataclass
class PipelineResult:
    pipeline: str
    version: str
    masks: list[Mask] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    profiles: list[SliceProfile] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def region(self, name: str) -> Region:
        return next(r for r in self.regions if r.name == name)

    def mask(self, label: str) -> Mask:
        return next(m for m in self.masks if m.segment.label == label)

    def region_mask(self, region: Region) -> np.ndarray | None:
        """The voxels of a region: its segment's mask, or the union of the masks it spans."""
        labels = (region.segment,) if region.segment else region.spans
        arrays = [self.mask(label).array for label in labels]
        return np.logical_or.reduce(arrays) if arrays else None

    def as_json(self) -> dict[str, object]:
        """Everything but the voxels: what the job records and `ainode run` writes."""
        return {
            "pipeline": self.pipeline,
            "version": self.version,
            "segments": [
                {**m.segment.as_json(), "voxels": int(np.count_nonzero(m.array))}
                for m in self.masks
            ],
            "regions": [r.as_json() for r in self.regions],
            "findings": [f.as_json() for f in self.findings],
            "detections": [d.as_json() for d in self.detections],
            "profiles": [
                {"name": p.name, "unit": p.unit.value, "values": list(p.values)}
                for p in self.profiles
            ],
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }

    def save(self, folder: Path) -> None:
        """Write result.json and, when there are masks, masks.npz (bit-packed) to `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RESULT_FILE).write_text(json.dumps(self.as_json(), indent=1), encoding="utf-8")
        if self.masks:
            np.savez_compressed(
                folder / MASKS_FILE,
                **{m.segment.label: np.packbits(m.array, axis=-1) for m in self.masks},
            )
