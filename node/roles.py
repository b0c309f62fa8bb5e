"""The roles of HTTP callers, apart from the config so that `ainode --help` (whose `token new
--role` lists them) loads no configuration models."""

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
    PHI = "phi"
    """See patients' names and IDs, accession numbers and study dates in the admin API and
    the dashboard, each view audited (DICOMweb always serves what was stored, to readers)."""
