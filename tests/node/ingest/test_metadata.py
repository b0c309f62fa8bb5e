"""Instance metadata from a dataset or its raw values: what the catalog keeps."""

from io import BytesIO

from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from node.ingest.metadata import InstanceMetadata
from tests.rows import metadata


def test_metadata_keeps_routing_fields() -> None:
    meta = metadata(1)
    assert meta.series_fields["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert meta.series_fields["slice_thickness"] == 1.25
    assert meta.series_fields["convolution_kernel"] == "LUNG"


def test_metadata_reads_raw_values_as_the_wire_has_them() -> None:
    ds = metadata(7).dataset
    ds.InstanceNumber = "12 "
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    raw = read_dataset(BytesIO(fp.getvalue()), is_implicit_VR=True, is_little_endian=True)

    meta = InstanceMetadata.from_dataset(raw)
    assert meta.key == metadata(7).key
    assert meta.instance_number == 12
    assert meta.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert meta.series_fields["modality"] == "CT"
