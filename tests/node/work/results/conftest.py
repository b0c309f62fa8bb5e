"""A real lung-quant result, encoded once for the encoder tests."""

from __future__ import annotations

import pydicom
import pytest

from node.work.results.encode import encode_result
from node.work.results.identity import ResultIdentity
from pipelines.lung_quant import LungQuantPipeline
from pipelines.volume import load_volume


@pytest.fixture(scope="session")  # its tests are one xdist group: one worker segments once
def encoded(real_series, tmp_path_factory: pytest.TempPathFactory):
    volume = load_volume(real_series["body-kernel"])
    result = LungQuantPipeline("cpu").run(volume)
    identity = ResultIdentity("lung-quant", "1.0", volume.series_instance_uid, 1, "AINODE")
    folder = tmp_path_factory.mktemp("encoded")
    sr_path, seg_path, *key_images = encode_result(result, volume, identity, folder)
    assert [p.name for p in key_images] == [f"key-image-{n}.dcm" for n in (1, 2, 3)]
    return volume, result, identity, pydicom.dcmread(seg_path), pydicom.dcmread(sr_path)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "encoded" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("encoded"))
