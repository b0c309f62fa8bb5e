"""SEG, SR and key images of a result together: valid (dciodvfy), stable UIDs, the source's Type 2
attributes kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from node.work.results.encode import encode_result
from node.work.results.identity import ResultIdentity
from pipelines.echo import EchoPipeline
from pipelines.lung_quant import LungQuantPipeline
from pipelines.volume import load_volume
from tests.dicom_checks import validate
from tests.phantoms import chest, chest_geometry, write_series


def test_both_objects_pass_dciodvfy(encoded, tmp_path: Path) -> None:
    *_, seg, sr = encoded
    for name, ds in (("seg.dcm", seg), ("sr.dcm", sr)):
        ds.save_as(tmp_path / name)
        validate(tmp_path / name)


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
    assert [p.name for p in files[:2]] == ["sr.dcm", "seg.dcm"]  # sent first, in this order
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
