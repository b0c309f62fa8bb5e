"""DICOM JSON (PS3.18 F) responses."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

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
