"""SEG and SR of a real lung-quant result: valid (dciodvfy), readable (dsrdump), in the source
study, referencing the right source slices, carrying the pipeline's values, stable UIDs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from node.results.encode import encode_result
from node.results.identity import ResultIdentity
from pipelines.echo import EchoPipeline
from pipelines.lung_quant import LungQuantPipeline
from pipelines.volume import load_volume
from tests.phantoms import chest, chest_geometry, write_series


def validate(path: Path) -> str:
    """dciodvfy's report; the test fails on any error line."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    report = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
    output = report.stdout + report.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    return output


@pytest.fixture(scope="module")
def encoded(real_series, tmp_path_factory: pytest.TempPathFactory):
    volume = load_volume(real_series["body-kernel"])
    result = LungQuantPipeline("cpu").run(volume)
    identity = ResultIdentity("lung-quant", "1.0", volume.series_instance_uid, 1, "AINODE")
    folder = tmp_path_factory.mktemp("encoded")
    seg_path, sr_path, *key_images = encode_result(result, volume, identity, folder)
    assert [p.name for p in key_images] == [f"key-image-{n}.dcm" for n in (1, 2, 3)]
    return volume, result, identity, pydicom.dcmread(seg_path), pydicom.dcmread(sr_path)


def test_both_objects_pass_dciodvfy(encoded, tmp_path: Path) -> None:
    *_, seg, sr = encoded
    for name, ds in (("seg.dcm", seg), ("sr.dcm", sr)):
        ds.save_as(tmp_path / name)
        validate(tmp_path / name)


def test_seg_frames_reference_the_source_slices_in_order(encoded) -> None:
    volume, result, _, seg, _ = encoded
    assert seg.StudyInstanceUID == volume.study_instance_uid
    assert seg.SeriesDescription == "AI: lung-quant 1.0"
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [m.segment.label for m in result.masks]
    assert all("RecommendedDisplayCIELabValue" in s for s in seg.SegmentSequence)
    assert seg.NumberOfFrames == 4 * len(volume.sources)  # empty frames kept
    parsed = hd.seg.Segmentation.from_dataset(seg)
    for segment_number, mask in enumerate(result.masks, start=1):
        uids = [s.sop_instance_uid for s in volume.sources]
        pixels = parsed.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[segment_number]
        )
        assert (pixels[..., 0] > 0).sum() == mask.array.sum()
        assert ((pixels[..., 0] > 0) == mask.array).all()
    ours = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == "ainode"]
    assert [(e.ManufacturerModelName, e.SoftwareVersions) for e in ours] == [("lung-quant", "1.0")]


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


def test_uids_are_stable_per_series_revision_pipeline_and_version(encoded) -> None:
    volume, _, identity, seg, sr = encoded
    assert seg.SOPInstanceUID == identity.uid("seg") and sr.SOPInstanceUID == identity.uid("sr")
    again = ResultIdentity("lung-quant", "1.0", volume.series_instance_uid, 1, "OTHER")
    assert again.uid("seg") == seg.SOPInstanceUID
    revised = ResultIdentity("lung-quant", "1.0", volume.series_instance_uid, 2, "AINODE")
    assert revised.uid("seg") != seg.SOPInstanceUID


def test_type2_attributes_the_source_lacks_are_written_empty(tmp_path: Path) -> None:
    geometry = chest_geometry()
    volume = load_volume(write_series(tmp_path / "src", geometry, chest((65, 0, 0), (-65, 0, 0))))
    assert "PatientBirthDate" not in pydicom.dcmread(volume.sources[0].path)
    identity = ResultIdentity("lung-quant", "1.0", volume.series_instance_uid, 1, "AINODE")
    files = encode_result(LungQuantPipeline("cpu").run(volume), volume, identity, tmp_path / "o")
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
            assert keyword in ds and ds[keyword].value in ("", None)
        validate(path)
    echo = EchoPipeline().run(volume)
    (sr_path,) = encode_result(echo, volume, identity, tmp_path / "echo")
    validate(sr_path)


def test_key_images_are_valid_secondary_captures_in_the_source_study(
    encoded, tmp_path: Path
) -> None:
    volume, result, identity, *_ = encoded
    files = encode_result(result, volume, identity, tmp_path)
    images = [pydicom.dcmread(p) for p in files if p.name.startswith("key-image-")]
    assert len(images) == 3
    for image in images:
        validate(image.filename)
        assert image.StudyInstanceUID == volume.study_instance_uid
        assert image.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert image.SeriesDescription == "AI: lung-quant 1.0 key images"
        assert image.PhotometricInterpretation == "RGB" and image.pixel_array.shape == (512, 512, 3)
    # the masks are drawn: lung pixels are tinted, not gray
    pixels = images[1].pixel_array.astype(int)
    tinted = np.abs(pixels[..., 0] - pixels[..., 2]) > 30
    assert tinted.sum() > 10_000


def test_a_detection_is_a_box_on_the_slice_through_its_centre(tmp_path: Path) -> None:
    from pipelines import codes
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
    from pipelines import codes
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


def qualitative_evaluations(report: hd.sr.Comprehensive3DSR) -> dict[str, tuple[str, float]]:
    """TID 1500's Qualitative Evaluations: finding -> (Present or Absent, probability)."""
    (container,) = [
        item
        for item in report.content[0].ContentSequence
        if item.name.meaning == "Qualitative Evaluations"
    ]
    return {
        item.name.meaning: (
            item.value.meaning,
            float(item.ContentSequence[0].MeasuredValueSequence[0].NumericValue),
        )
        for item in container.ContentSequence
    }
