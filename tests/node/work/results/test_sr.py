"""The TID 1500 SR: the pipeline's values readable by dsrdump, detections as boxes, whole-scan
findings in Qualitative Evaluations; and the highdicom behaviour `measurement_report` works
around, pinned."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from node.work.results.encode import encode_result
from node.work.results.identity import ResultIdentity
from pipelines import codes
from pipelines.volume import load_volume
from tests.dicom_checks import dciodvfy_unknown_schemes, qualitative_evaluations, validate
from tests.phantoms import chest, chest_geometry, write_series


def test_sr_holds_the_pipelines_values_and_dsrdump_reads_it(encoded, tmp_path: Path) -> None:
    volume, result, _, seg, sr = encoded
    assert sr.StudyInstanceUID == volume.study_instance_uid
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = report.content.get_image_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == [r.name for r in result.regions]
    for group in groups:
        region = result.region(str(group.tracking_identifier))
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values == {m.concept.value: pytest.approx(m.value) for m in region.measurements}
        # the first measurement is inferred from the region's SEG frames and from its outline
        first = group.get_measurements()[0]
        (seg_frames,) = first.referenced_images
        assert seg_frames.referenced_sop_instance_uid == seg.SOPInstanceUID
        (outline,) = first.referenced_coordinates
        (image,) = outline.ContentSequence
        index = [s.sop_instance_uid for s in volume.sources].index(
            image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        )
        mask = result.region_mask(region)
        assert mask[index].sum() == mask.sum(axis=(1, 2)).max()  # the largest slice
        points = np.asarray(outline.GraphicData).reshape(-1, 2)
        columns, rows = points[:, 0].astype(int), points[:, 1].astype(int)
        near = [
            mask[index, max(0, r - 1) : r + 2, max(0, c - 1) : c + 2].any()
            for c, r in zip(columns, rows, strict=True)
        ]
        assert all(near)  # the outline runs along the mask's border
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (DCMTK) is not installed")
    tree = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=True)
    assert "Imaging Measurement Report" in tree.stdout
    assert "Tracking Identifier" in tree.stdout and '"Both lungs"' in tree.stdout
    (note,) = result.notes  # the reconstruction densitometry was measured on, in words
    assert f'"Comment")="{note.text[:20]}' in tree.stdout


def test_a_detection_is_a_box_on_the_slice_through_its_centre(tmp_path: Path) -> None:
    from pipelines.result import Detection, PipelineResult

    geometry = chest_geometry()
    geometry.positions.reverse()  # files written head first; the volume still ascends
    volume = load_volume(write_series(tmp_path / "src", geometry, chest((65, 0, 0), (-65, 0, 0))))
    nodule = codes.sct("27925004", "Nodule")
    box_min, box_max = (50.0, -10.0, -12.0), (70.0, 14.0, 8.0)  # LPS mm, centre z = -2
    result = PipelineResult(
        "nodule-test", "0.1", detections=[Detection(nodule, 0.87, box_min, box_max)]
    )
    identity = ResultIdentity("nodule-test", "0.1", volume.series_instance_uid, 1, "AINODE")
    (sr_path,) = encode_result(result, volume, identity, tmp_path / "out")
    validate(sr_path)
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
    (group,) = report.content.get_planar_roi_measurement_groups()
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert values == {"Long Axis": pytest.approx(24.0, abs=2.1), "Probability": 0.87}
    region = group.roi
    uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    index = [s.sop_instance_uid for s in volume.sources].index(uid)
    assert volume.to_patient((index, 0, 0))[2] == pytest.approx(-2.0, abs=2.5)
    corners = np.asarray(region.GraphicData).reshape(-1, 2)
    for column, row in corners[:4]:
        x, y, _ = volume.to_patient((index, row - 0.5, column - 0.5))
        assert x == pytest.approx(50.0, abs=0.1) or x == pytest.approx(70.0, abs=0.1)
        assert y == pytest.approx(-10.0, abs=0.1) or y == pytest.approx(14.0, abs=0.1)


def test_findings_are_present_or_absent_with_their_probability(tmp_path: Path) -> None:
    from pipelines.result import Finding, PipelineResult

    volume = load_volume(write_series(tmp_path / "src", chest_geometry(), chest()))
    emphysema, effusion = codes.PULMONARY_EMPHYSEMA, codes.sct("60046008", "Pleural effusion")
    result = PipelineResult(
        "findings-test",
        "0.1",
        findings=[Finding(emphysema, 0.91, True), Finding(effusion, 0.04, False)],
    )
    identity = ResultIdentity("findings-test", "0.1", volume.series_instance_uid, 1, "AINODE")
    sr_path, key_image = encode_result(result, volume, identity, tmp_path / "out")
    validate(sr_path)
    validate(key_image)  # the findings written on a slice, for viewers that show no SR
    image = pydicom.dcmread(key_image)
    assert image.StudyInstanceUID == pydicom.dcmread(sr_path).StudyInstanceUID
    red, green, blue = np.moveaxis(image.pixel_array.astype(int), -1, 0)
    yellow = (red > 180) & (green > 180) & (blue < 100)
    assert yellow[:40].sum() > 50  # the text lines at the top
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
    assert report.content.get_image_measurement_groups() == []  # none: nothing on an image
    assert qualitative_evaluations(report) == {
        "Pulmonary emphysema": ("Present", 0.91),
        "Pleural effusion": ("Absent", 0.04),
    }


def test_highdicom_still_needs_the_measurement_report_helper() -> None:
    """`node.work.results.sr.measurement_report` exists because highdicom's MeasurementReport takes
    no Qualitative Evaluations and refuses a report without measurement groups. When this
    fails, highdicom has caught up: build the report with it alone and drop the helper."""
    import inspect

    from pipelines import codes

    parameters = inspect.signature(hd.sr.MeasurementReport).parameters
    assert not any("qualitative" in name for name in parameters)
    context = hd.sr.ObservationContext()
    with pytest.raises(ValueError, match="at least one item"):
        hd.sr.MeasurementReport(context, codes.CT_CHEST.as_dicom(), imaging_measurements=[])


def test_the_private_coding_scheme_is_declared_where_it_is_used(encoded) -> None:
    """Issue 25's 19: the SR names 99AINODE in its Coding Scheme Identification Sequence
    (PS3.3 C.12.1.1.2); an object that uses no private code declares none."""
    _, _, _, seg, sr = encoded
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert (scheme.CodingSchemeDesignator, scheme.CodingSchemeName) == (
        "99AINODE",
        "ainode private codes",
    )
    assert "CodingSchemeIdentificationSequence" not in seg


def test_dciodvfy_knows_every_coding_scheme_but_the_declared_private_one(encoded, tmp_path) -> None:
    """Issue 25's 19: standard codes wherever PS3.16 has one; dciodvfy warns of each use of a
    private scheme, so what is left is the declaration and the three densitometry measures
    per region that no standard code names (LAA-950, Perc15, high attenuation)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    _, result, _, _, sr = encoded
    sr.save_as(tmp_path / "sr.dcm")
    unknown = dciodvfy_unknown_schemes(tmp_path / "sr.dcm")
    private = [
        measurement.concept.value
        for region in result.regions
        for measurement in region.measurements
        if measurement.concept.scheme == codes.PRIVATE_SCHEME
    ]
    assert set(private) <= {codes.LAA950.value, codes.PERC15.value, codes.HIGH_ATTENUATION.value}
    assert unknown == [codes.PRIVATE_SCHEME] * (len(private) + 1)
