"""JPEG Lossless decoded by libjpeg-turbo (imagecodecs), checked against pydicom's
pylibjpeg-libjpeg plugin on real Siemens files and on signed and colour frames the tests
encode; a frame the plugin refuses is decoded by pydicom's own plugins."""

from __future__ import annotations

import logging
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from pipelines import decoding


def jpeg_lossless(pixels: np.ndarray, signed: bool = False) -> Dataset:
    """A dataset holding `pixels` (rows, columns[, 3]) as JPEG Lossless SV1."""
    colour = pixels.ndim == 3
    stored = pixels.view(np.uint16) if signed else pixels
    frame = imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


def test_real_jpeg_lossless_decodes_as_pylibjpeg_decodes_it(
    real_series: dict[str, list[Path]],
) -> None:
    for path in real_series["covid"][::37]:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID in decoding.SYNTAXES
        ours = decoding.pixel_array(ds)
        reference = pydicom.dcmread(path)
        reference.pixel_array_options(decoding_plugin="pylibjpeg")
        np.testing.assert_array_equal(ours, reference.pixel_array)
    assert decoding.PLUGIN in get_decoder(JPEGLosslessSV1).available_plugins


def test_signed_frames_keep_their_sign(caplog: pytest.LogCaptureFixture) -> None:
    pixels = np.arange(-1024, 3072, dtype=np.int16).reshape(64, 64)
    ds = jpeg_lossless(pixels, signed=True)
    with caplog.at_level(logging.INFO, logger="pipelines.decoding"):
        decoded = decoding.pixel_array(ds)
    assert "did not decode" not in caplog.text  # libjpeg-turbo decoded it
    assert decoded.dtype == np.int16
    np.testing.assert_array_equal(decoded, pixels)


def test_a_frame_the_plugin_refuses_is_decoded_by_pydicoms_plugins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    ds = jpeg_lossless(rgb)
    with caplog.at_level(logging.INFO, logger="pipelines.decoding"):
        decoded = decoding.pixel_array(ds)
    np.testing.assert_array_equal(decoded, rgb)
    assert "greyscale frames only" in caplog.text


def test_other_syntaxes_are_left_to_pydicom() -> None:
    ds = jpeg_lossless(np.zeros((8, 8), dtype=np.uint16))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.full((8, 8), 7, dtype=np.uint16).tobytes()
    assert not decoding.is_available(ds.file_meta.TransferSyntaxUID)
    assert (decoding.pixel_array(ds) == 7).all()
