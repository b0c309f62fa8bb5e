"""A pipeline's result checks itself when built: each inconsistency a ValueError that names
the field, never a StopIteration or a broken SEG later."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines import codes
from pipelines.result import (
    Detection,
    Finding,
    Mask,
    Measurement,
    PipelineResult,
    Region,
    Segment,
)

LUNG = Segment("Lung", codes.ANATOMICAL_STRUCTURE, codes.LUNG)
GRID = (4, 5, 6)


def mask(label: str = "Lung", shape: tuple[int, ...] = GRID) -> Mask:
    segment = Segment(label, codes.ANATOMICAL_STRUCTURE, codes.LUNG)
    return Mask(segment, np.ones(shape, dtype=bool))


def test_a_consistent_result_is_built_and_found_by_label() -> None:
    region = Region("Lung", codes.LUNG, (Measurement(codes.VOLUME, 5.0, codes.MILLILITER),), "Lung")
    result = PipelineResult("p", "1", masks=[mask(), mask("Nodule 1")], regions=[region])
    assert result.segment_number("Nodule 1") == 2
    assert result.mask("Lung").array.shape == GRID
    assert result.region_mask(region) is not None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: mask(shape=(5, 6)), "2-D, not 3-D"),
        (lambda: Mask(LUNG, np.full(GRID, 2, dtype=np.uint8)), "values other than 0 and 1"),
        (lambda: Measurement(codes.VOLUME, float("nan"), codes.MILLILITER), "not finite"),
        (lambda: Finding(codes.PULMONARY_EMPHYSEMA, 1.2, True), "outside 0..1"),
        (lambda: Finding(codes.PULMONARY_EMPHYSEMA, float("nan"), True), "outside 0..1"),
        (lambda: Detection(codes.LUNG, 0.5, (0, 0, 9), (1, 1, 1)), "exceeds box_max"),
        (lambda: Detection(codes.LUNG, -0.1, (0, 0, 0), (1, 1, 1)), "outside 0..1"),
        (lambda: PipelineResult("p", "1", masks=[mask(), mask()]), "mask labels repeat"),
        (
            lambda: PipelineResult("p", "1", masks=[mask(), mask("B", (4, 5, 7))]),
            "masks of different shapes",
        ),
        (
            lambda: PipelineResult("p", "1", regions=[Region("R", codes.LUNG, (), "Gone")]),
            "region 'R' names mask 'Gone'",
        ),
        (
            lambda: PipelineResult(
                "p", "1", detections=[Detection(codes.LUNG, 0.5, (0, 0, 0), (1, 1, 1), None, "X")]
            ),
            "names mask 'X'",
        ),
    ],
)
def test_an_inconsistent_part_is_refused_with_its_reason(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_a_result_grown_after_it_was_built_is_checked_again() -> None:
    result = PipelineResult("p", "1", masks=[mask()])
    result.masks.append(mask())  # as a pipeline appends per detection
    with pytest.raises(ValueError, match="repeat"):
        result.check()


def test_an_unknown_label_or_region_is_a_key_error_that_names_it() -> None:
    result = PipelineResult("p", "1", masks=[mask()])
    with pytest.raises(KeyError, match="no mask 'Nodule 9'"):
        result.mask("Nodule 9")
    with pytest.raises(KeyError, match="no region 'Liver'"):
        result.region("Liver")
