"""`scan_dataset` against pydicom: the same values from real files, the same streams refused;
and `read_metadata` refuses what is not whole or not in its transfer syntax."""

from __future__ import annotations

import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node.ingest.metadata import HOT_TAGS, parse, read_metadata
from node.ingest.scan import scan_dataset

SOP_INSTANCE_UID = 0x00080018


def dataset_bytes(path: Path) -> tuple[bytes, UID]:
    """The dataset of a file as a sender puts it on the wire (file meta left out)."""
    with path.open("rb") as fp:
        pydicom.filereader.read_preamble(fp, False)
        meta = pydicom.filereader._read_file_meta_info(fp)
        return fp.read(), UID(meta.TransferSyntaxUID)


def encode(ds: Dataset, implicit_vr: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit_vr
    write_dataset(fp, ds)
    return fp.getvalue()


def nested() -> Dataset:
    """Undefined-length sequences two deep, an empty item, an undefined-length UN holding
    implicit VR items, and encapsulated pixel data: every kind of value the scan skips."""
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "T-D3000", "Chest"
    outer = Dataset()
    outer.ReferencedSOPInstanceUID = "1.2.3.4.5.6"
    outer.ConceptNameCodeSequence = Sequence([inner])
    outer["ConceptNameCodeSequence"].is_undefined_length = True
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.ReferencedImageSequence = Sequence([outer, Dataset()])
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.InstanceNumber = "12"
    return ds


def test_real_files_give_pydicom_values(real_series: dict[str, list[Path]]) -> None:
    files = [path for paths in real_series.values() for path in paths]
    for path in files:
        encoded, syntax = dataset_bytes(path)
        scanned = scan_dataset(encoded, syntax.is_implicit_VR, HOT_TAGS).values
        parsed = parse(encoded, syntax)
        expected = {tag: parsed.get_item(tag).value for tag in HOT_TAGS if tag in parsed}
        assert scanned == expected, path.name
    syntaxes = {str(dataset_bytes(path)[1]) for path in files}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.4.70"} <= syntaxes


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_nested_undefined_lengths_are_skipped(implicit_vr: bool) -> None:
    ds = nested()
    encoded = encode(ds, implicit_vr)
    assert scan_dataset(encoded, implicit_vr, HOT_TAGS).values == {
        0x00080016: b"1.2.840.10008.5.1.4.1.1.2\0",
        0x00080018: b"1.2.3.4.5.6.7\0",
        0x0020000D: b"1.2.3\0",
        0x0020000E: b"1.2.3.4\0",
        0x00200013: b"12",
    }


def test_undefined_length_un_and_encapsulated_pixel_data_are_skipped() -> None:
    implicit_sequence = encode(nested(), implicit_vr=True)[
        len(encode(Dataset(), implicit_vr=True)) :
    ]
    un = bytes.fromhex("0900 1010 554e 0000 ffffffff")  # (0009,1010) UN, undefined length
    item = (
        bytes.fromhex("feff 00e0 ffffffff")
        + implicit_sequence
        + bytes.fromhex("feff 0de0 00000000")
    )
    pixels = (
        bytes.fromhex("e07f 1000 4f42 0000 ffffffff")
        + bytes.fromhex("feff 00e0 00000000")
        + bytes.fromhex("feff 00e0 04000000")
        + b"\xff\xd8\xff\xd9"
        + bytes.fromhex("feff dde0 00000000")
    )
    head = encode(nested(), implicit_vr=False)
    encoded = head + un + item + bytes.fromhex("feff dde0 00000000") + pixels
    assert scan_dataset(encoded, False, [SOP_INSTANCE_UID]).values == {
        SOP_INSTANCE_UID: b"1.2.3.4.5.6.7\0"
    }
    with pytest.raises(ValueError):
        scan_dataset(encoded[:-8], False, [SOP_INSTANCE_UID])  # no sequence delimiter


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_a_stream_cut_anywhere_but_between_elements_is_refused(implicit_vr: bool) -> None:
    """Whatever the scan accepts, pydicom reads to the same values; it accepts a cut stream
    only where an element ends."""
    ds = nested()
    ds.PixelData = b"\0" * 16
    ds["PixelData"].VR = "OW"
    encoded = encode(ds, implicit_vr)
    syntax = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    accepted = []
    for cut in range(1, len(encoded) + 1):
        stream = encoded[:cut]
        try:
            scanned = scan_dataset(stream, implicit_vr, HOT_TAGS).values
        except ValueError:
            continue
        accepted.append(cut)
        parsed = parse(stream, syntax)
        assert scanned == {tag: parsed.get_item(tag).value for tag in HOT_TAGS if tag in parsed}
    ends = [len(encode(ds[: element.tag], implicit_vr)) for element in ds][1:]
    assert accepted == [*ends, len(encoded)]


def test_deflated_stream_is_inflated_once() -> None:
    ds = nested()
    explicit = encode(ds, implicit_vr=False)
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = compressor.compress(explicit) + compressor.flush()
    meta = read_metadata(deflated, DeflatedExplicitVRLittleEndian)
    assert meta.key.sop_instance_uid == "1.2.3.4.5.6.7" and meta.instance_number == 12
    assert meta.dataset.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.5.6"


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_data_in_the_other_vr_encoding_is_refused(implicit_vr: bool) -> None:
    """Some senders encode implicit VR under an explicit VR transfer syntax (or the reverse);
    stored, the file would name the wrong transfer syntax."""
    wrong = encode(nested(), implicit_vr=not implicit_vr)
    syntax = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    with pytest.raises(ValueError, match="VR"):
        read_metadata(wrong, syntax)


def test_big_endian_goes_to_pydicom() -> None:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = False, False
    write_dataset(fp, nested())
    meta = read_metadata(fp.getvalue(), ExplicitVRBigEndian)
    assert meta.key.series_uid == "1.2.3.4" and meta.instance_number == 12


def test_a_real_jpeg_instance_missing_its_last_bytes_is_refused(
    real_series: dict[str, list[Path]],
) -> None:
    """The last 1-4 bytes of an encapsulated stream are the sequence delimiter's length."""
    encoded, syntax = dataset_bytes(real_series["covid"][0])
    assert syntax.is_compressed
    assert read_metadata(encoded, syntax).key.sop_instance_uid
    for missing in (1, 2, 3, 4, 8, 100, len(encoded) // 2):
        with pytest.raises(ValueError):
            read_metadata(encoded[:-missing], syntax)


def test_an_image_cut_before_its_pixel_data_is_refused() -> None:
    ds = nested()
    ds.Rows, ds.Columns = 2, 2
    cut = encode(ds, False)
    ds.PixelData = b"\0" * 8
    ds["PixelData"].VR = "OW"
    assert read_metadata(encode(ds, False), ExplicitVRLittleEndian).instance_number == 12
    with pytest.raises(ValueError, match="without its pixel data"):
        read_metadata(cut, ExplicitVRLittleEndian)
