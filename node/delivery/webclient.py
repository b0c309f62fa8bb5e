"""A dicomweb-client for a configured DICOMweb server (sending results, fetching studies)."""

from __future__ import annotations

import requests
from dicomweb_client.api import DICOMwebClient

from node.config import DicomWebDestination


def dicomweb_client(server: DicomWebDestination, timeout: float) -> DICOMwebClient:
    """Its credentials (token or user and password) and TLS checks; no automatic retries (the
    node's queues retry with backoff)."""
    session = requests.Session()
    session.verify = str(server.ca_file) if server.ca_file else server.verify_tls
    if server.token:
        session.headers["Authorization"] = f"Bearer {server.token}"
    elif server.username is not None:
        session.auth = (server.username, server.password or "")
    client = DICOMwebClient(url=server.url.rstrip("/"), session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)
    return client
