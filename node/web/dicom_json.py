"""DICOM JSON (PS3.18 F) responses, and the Native DICOM Model XML (PS3.19) on request."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from xml.etree import ElementTree

from fastapi import Response
from pydicom import Dataset

DICOM_JSON = "application/dicom+json"


def dicom_json_response(
    body: Dataset | Iterable[Dataset | dict[str, Any]], status: int = 200
) -> Response:
    """One dataset (a Store Instances Response) or an array of them (QIDO-RS, metadata),
    each a Dataset or its DICOM JSON already."""
    if isinstance(body, Dataset):
        content: object = body.to_json_dict()
    else:
        content = [ds if isinstance(ds, dict) else ds.to_json_dict() for ds in body]
    return Response(json.dumps(content), status_code=status, media_type=DICOM_JSON)


DICOM_XML = "application/dicom+xml"
NATIVE_MODEL = "http://dicom.nema.org/PS3.19/models/NativeDICOM"


def dicom_xml_response(dataset: Dataset, status: int = 200) -> Response:
    """One dataset in the Native DICOM Model (PS3.19 A.1), for clients that ask for XML."""
    root = ElementTree.Element("NativeDicomModel", xmlns=NATIVE_MODEL)
    _native(root, dataset)
    body = ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
    return Response(body, status_code=status, media_type=DICOM_XML)


def _native(parent: ElementTree.Element, dataset: Dataset) -> None:
    for element in dataset:
        names = {"tag": f"{element.tag:08X}", "vr": element.VR, "keyword": element.keyword}
        attribute = ElementTree.SubElement(parent, "DicomAttribute", names)
        if element.VR == "SQ":
            for number, item in enumerate(element.value, start=1):
                _native(ElementTree.SubElement(attribute, "Item", number=str(number)), item)
            continue
        values = element.value if element.VM > 1 else [element.value]
        for number, value in enumerate(values, start=1):
            if value is not None and value != "":
                ElementTree.SubElement(attribute, "Value", number=str(number)).text = str(value)


def wants_xml(accept: str | None) -> bool:
    """Whether the client asks for XML rather than JSON (JSON when it accepts both)."""
    kinds = [entry.split(";")[0].strip().lower() for entry in (accept or "").split(",")]
    return DICOM_XML in kinds and DICOM_JSON not in kinds and "application/json" not in kinds
