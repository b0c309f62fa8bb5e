"""What the DICOMweb service serves, for a client to discover (PS3.18 8.9, the Capabilities
transaction): `OPTIONS /dicom-web` answers the resources, their methods and media types as
JSON. It names no patient data and needs no credentials."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

router = APIRouter()

JSON = "application/dicom+json"
DICOM = 'multipart/related; type="application/dicom"'
FRAMES = 'multipart/related; type="application/octet-stream" (or the stored image type)'
RESOURCES: dict[str, dict[str, Any]] = {
    "/studies": {"GET": ["QIDO-RS", JSON], "POST": ["STOW-RS", DICOM]},
    "/studies/{study}": {"GET": ["WADO-RS", DICOM], "POST": ["STOW-RS", DICOM]},
    "/studies/{study}/metadata": {"GET": ["WADO-RS", JSON]},
    "/studies/{study}/series": {"GET": ["QIDO-RS", JSON]},
    "/studies/{study}/instances": {"GET": ["QIDO-RS", JSON]},
    "/series": {"GET": ["QIDO-RS", JSON]},
    "/instances": {"GET": ["QIDO-RS", JSON]},
    "/studies/{study}/series/{series}": {"GET": ["WADO-RS", DICOM]},
    "/studies/{study}/series/{series}/metadata": {"GET": ["WADO-RS", JSON]},
    "/studies/{study}/series/{series}/instances": {"GET": ["QIDO-RS", JSON]},
    "/studies/{study}/series/{series}/instances/{instance}": {"GET": ["WADO-RS", DICOM]},
    "/studies/{study}/series/{series}/instances/{instance}/metadata": {"GET": ["WADO-RS", JSON]},
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}": {
        "GET": ["WADO-RS", FRAMES]
    },
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}": {
        "GET": ["WADO-RS", 'multipart/related; type="application/octet-stream"']
    },
}
TRANSFER_SYNTAXES = {
    "retrieve": ["* (as stored)", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
    "store": ["any the DICOM standard defines; stored as sent"],
}


@router.options("", include_in_schema=False)
@router.options("/", include_in_schema=False)
def capabilities() -> JSONResponse:
    methods = sorted({m for resource in RESOURCES.values() for m in resource} | {"OPTIONS"})
    body = {
        "service": "DICOMweb (PS3.18): QIDO-RS, WADO-RS, STOW-RS",
        "authentication": "Authorization: Bearer <token or OIDC JWT>",
        "resources": {
            path: {
                method: {"transaction": kind, "media_type": media}
                for method, (kind, media) in r.items()
            }
            for path, r in RESOURCES.items()
        },
        "transfer_syntaxes": TRANSFER_SYNTAXES,
        "query": {
            "matching": "single value, UID list, * and ? wildcards, date and time ranges",
            "control": ["limit", "offset", "includefield", "fuzzymatching"],
        },
    }
    return JSONResponse(body, headers={"Allow": ", ".join(methods)})
