"""Key images: a few slices with the masks drawn over them and the key numbers as text, as a
Secondary Capture series, for PACS and viewers that show neither SR nor SEG."""

from __future__ import annotations

import textwrap

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

from node.work.results.identity import MANUFACTURER, NOT_FOR_DIAGNOSIS, ResultIdentity
from pipelines.codes import SHORT_NAMES
from pipelines.result import PipelineResult
from pipelines.volume import Volume

KEY_IMAGES_SERIES_NUMBER = 9003
LUNG_WINDOW = (-1350.0, 150.0)
ALPHA = 0.35
FRACTIONS = (0.3, 0.5, 0.7)
NOTE_WIDTH = 80
"""Characters a line of a note takes on a 512-column slice in PIL's default font."""


def key_slices(result: PipelineResult, slices: int, count: int = len(FRACTIONS)) -> list[int]:
    """Slices at 30, 50 and 70 % of the extent of the masks; for whole-scan findings without
    masks, the middle slice (the findings written on it are what a viewer can show of them)."""
    if not result.masks:
        return [slices // 2] if result.findings else []
    covered = np.flatnonzero(np.logical_or.reduce([m.array.any(axis=(1, 2)) for m in result.masks]))
    if covered.size == 0:
        return []
    first, last = int(covered[0]), int(covered[-1])
    return sorted({round(first + f * (last - first)) for f in FRACTIONS[:count]})


def render(result: PipelineResult, volume: Volume, index: int) -> np.ndarray:
    """One slice in a lung window, the masks blended in their colours, the numbers written."""
    low, high = LUNG_WINDOW
    gray = np.clip((volume.voxels[index].astype(np.float32) - low) / (high - low), 0, 1) * 255
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for mask in result.masks:
        inside = mask.array[index]
        rgb[inside] = (1 - ALPHA) * rgb[inside] + ALPHA * np.asarray(mask.segment.color_rgb)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    lines = [f"{result.pipeline} {result.version} - {NOT_FOR_DIAGNOSIS}"]
    for region in result.regions:
        values = ", ".join(
            f"{SHORT_NAMES.get(m.concept, m.concept.meaning)} {m.value:g} {_unit(m.unit.value)}"
            for m in region.measurements
        )
        lines.append(f"{region.name}: {values}")
    for finding in result.findings:
        called = "PRESENT" if finding.present else "absent"
        lines.append(f"{finding.concept.meaning}: {called} (p={finding.probability:.2f})")
    for note in result.notes:  # what the SR says of how the numbers were made
        lines.extend(textwrap.wrap(note.text, NOTE_WIDTH))
    draw.multiline_text((6, 6), "\n".join(lines), fill=(255, 255, 0), spacing=2)
    return np.asarray(image)


def build_key_images(
    result: PipelineResult, volume: Volume, sources: list[Dataset], identity: ResultIdentity
) -> list[hd.sc.SCImage]:
    if len(sources) != len(volume.sources):
        return []  # multi-frame sources: no single-slice reference dataset to copy from
    images = []
    for number, index in enumerate(key_slices(result, len(volume.sources)), start=1):
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=sources[index],
            pixel_array=render(result, volume, index),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=identity.uid("key-images-series"),
            series_number=KEY_IMAGES_SERIES_NUMBER,
            sop_instance_uid=identity.uid(f"key-image-{number}"),
            instance_number=number,
            manufacturer=MANUFACTURER,
            patient_orientation=("L", "P"),
            contributing_equipment=[identity.contributing_equipment()],
        )
        image.SeriesDescription = f"{identity.series_description} key images"
        image.ImageComments = NOT_FOR_DIAGNOSIS
        image.Laterality = ""  # Type 2C; both lungs, no single side
        images.append(image)
    return images


def _unit(code: str) -> str:
    return {"[hnsf'U]": "HU"}.get(code, code)
