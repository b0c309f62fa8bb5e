"""What a pipeline returns: masks with coded segments, measurements per region, findings and
detections. Encoders (SR, SEG) read this; nothing here writes DICOM.

Every type checks itself when built and raises ValueError naming the field and why (a mask
that is not 3-D, a probability outside 0..1, a region that names a mask the result lacks), so
a pipeline's mistake stops at the pipeline, not in an encoder.

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
EMBEDDING_FILE = "embedding.npy"


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
    """(slice, row, column) on the volume's grid, boolean or 0/1."""

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"mask {self.segment.label!r}: {self.array.ndim}-D, not 3-D")
        if self.array.dtype != bool and not np.isin(self.array, (0, 1)).all():
            raise ValueError(f"mask {self.segment.label!r}: values other than 0 and 1")


@dataclass(frozen=True)
class Measurement:
    concept: Code
    value: float
    unit: Code

    def __post_init__(self) -> None:
        if not np.isfinite(self.value):
            raise ValueError(f"measurement {self.concept.meaning!r}: {self.value} is not finite")

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
    """A classifier's output for one label: its probability and the decision at its threshold.
    `normal` marks the label that means nothing was found (it never makes a study positive)."""

    concept: Code
    probability: float
    present: bool
    normal: bool = False

    def __post_init__(self) -> None:
        _probability(f"finding {self.concept.meaning!r}", self.probability)

    def as_json(self) -> dict[str, object]:
        return {
            "concept": self.concept.as_json(),
            "probability": self.probability,
            "present": self.present,
            "normal": self.normal,
        }


@dataclass(frozen=True)
class Note:
    """What a reader must know of how a result was made, in words (the SR's qualitative
    evaluations carry it as text): e.g. on which reconstruction densitometry was measured,
    or why it was not."""

    concept: Code
    text: str

    def as_json(self) -> dict[str, object]:
        return {"concept": self.concept.as_json(), "text": self.text}


@dataclass(frozen=True)
class Detection:
    """A detected object: its box in patient coordinates (mm) and its score; optionally where
    it lies, its own segment (a mask of that label) and further measurements."""

    label: Code
    score: float
    box_min: tuple[float, float, float]
    box_max: tuple[float, float, float]
    finding_site: Code | None = None
    segment: str | None = None
    measurements: tuple[Measurement, ...] = ()

    def __post_init__(self) -> None:
        what = f"detection {self.label.meaning!r}"
        _probability(what, self.score)
        if len(self.box_min) != 3 or len(self.box_max) != 3:
            raise ValueError(f"{what}: box corners are not 3-D points")
        if any(low > high for low, high in zip(self.box_min, self.box_max, strict=True)):
            raise ValueError(f"{what}: box_min {self.box_min} exceeds box_max {self.box_max}")

    @property
    def center(self) -> tuple[float, float, float]:
        (x0, y0, z0), (x1, y1, z1) = self.box_min, self.box_max
        return (x0 + x1) / 2, (y0 + y1) / 2, (z0 + z1) / 2

    def as_json(self) -> dict[str, object]:
        return {
            "label": self.label.as_json(),
            "score": self.score,
            "box_min_mm": list(self.box_min),
            "box_max_mm": list(self.box_max),
            "center_mm": [round(v, 2) for v in self.center],
            "finding_site": self.finding_site.as_json() if self.finding_site else None,
            "segment": self.segment,
            "measurements": [m.as_json() for m in self.measurements],
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
    notes: list[Note] = field(default_factory=list)
    embedding: np.ndarray | None = None
    profile: np.ndarray | None = None
    """The embedding's coarse layout along the body axis (`networks.axial_profile`), which
    the node's series input guard scores."""
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError unless the parts agree: masks of one shape and distinct labels,
        and every segment a region, a span or a detection names among the masks. Called when
        built, and again by whoever runs the pipeline (its lists may grow after)."""
        labels = [m.segment.label for m in self.masks]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{self.pipeline}: mask labels repeat: {labels}")
        shapes = {m.array.shape for m in self.masks}
        if len(shapes) > 1:
            raise ValueError(f"{self.pipeline}: masks of different shapes {sorted(shapes)}")
        named = [(f"region {r.name!r}", s) for r in self.regions for s in (r.segment, *r.spans)]
        named += [(f"detection {d.label.meaning!r}", d.segment) for d in self.detections]
        for what, label in named:
            if label is not None and label not in labels:
                raise ValueError(f"{self.pipeline}: {what} names mask {label!r}, not in {labels}")

    @property
    def positive(self) -> bool:
        """Something was found: a finding other than normal, or a detection."""
        return bool(self.detections) or any(f.present and not f.normal for f in self.findings)

    @property
    def reportable(self) -> bool:
        """Whether there is anything for an SR (an embedding alone is not)."""
        return bool(self.masks or self.regions or self.findings or self.detections)

    def region(self, name: str) -> Region:
        found = next((r for r in self.regions if r.name == name), None)
        if found is None:
            raise KeyError(f"{self.pipeline}: no region {name!r}")
        return found

    def mask(self, label: str) -> Mask:
        return self.masks[self.segment_number(label) - 1]

    def segment_number(self, label: str) -> int:
        """The SEG segment number of a mask (1-based, in result order)."""
        for number, mask in enumerate(self.masks, start=1):
            if mask.segment.label == label:
                return number
        raise KeyError(f"{self.pipeline}: no mask {label!r}")

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
            "notes": [n.as_json() for n in self.notes],
            "profiles": [
                {"name": p.name, "unit": p.unit.value, "values": list(p.values)}
                for p in self.profiles
            ],
            "embedding_dim": None if self.embedding is None else int(self.embedding.size),
            "positive": self.positive,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }

    def save(self, folder: Path) -> None:
        """Write result.json, masks.npz (bit-packed) and embedding.npy when there are any."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RESULT_FILE).write_text(json.dumps(self.as_json(), indent=1), encoding="utf-8")
        if self.embedding is not None:
            np.save(folder / EMBEDDING_FILE, self.embedding.astype(np.float32))
        if self.masks:
            packed = {m.segment.label: np.packbits(m.array, axis=-1) for m in self.masks}
            np.savez_compressed(folder / MASKS_FILE, allow_pickle=False, **packed)


def _probability(what: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"{what}: probability {value} is outside 0..1")
