"""The roles of HTTP callers and of the node's processes, apart from the config so that
`ainode --help` (whose `token new --role` and `serve --role` list them) loads no configuration
models."""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    """What an HTTP caller may do; each role also grants those it lists in `ROLE_GRANTS`."""

    SENDER = "sender"
    """Store instances (STOW-RS)."""
    READER = "reader"
    """Query and retrieve (QIDO-RS, WADO-RS), read the API."""
    OPERATOR = "operator"
    """Act on work: retry, cancel, re-send, fetch."""
    ADMIN = "admin"
    """Change the configuration: rules."""
    WORKER = "worker"
    """Claim jobs, read their series (WADO-RS) and record their results: a worker on another
    host (`ainode worker --node URL`)."""
    PHI = "phi"
    """See patients' names and IDs, accession numbers and study dates in the admin API and
    the dashboard, each view audited (DICOMweb always serves what was stored, to readers)."""


class ServiceRole(enum.StrEnum):
    """What an `ainode serve` process tree runs: every role by default, or some of them, each
    tree started and scaled on its own."""

    EDGE = "edge"
    """The DICOM receivers (C-STORE, C-FIND/MOVE/GET, storage commitment)."""
    HTTP = "http"
    """The HTTP server: DICOMweb, UPS-RS, the API and the dashboard."""
    COORDINATOR = "coordinator"
    """Completion, routing, dispatch, retention, fetches, notifications, workitems and the
    audit export: one active among those started, the others standing by."""
    WORKER = "worker"
    """The pipeline workers."""
