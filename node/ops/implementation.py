"""How the node names itself on the wire (A-ASSOCIATE) and in the files it writes (the File
Meta Information): Implementation Class UID and Version Name (PS3.7 D.3.3.2)."""

from __future__ import annotations

from importlib.metadata import version

from pydicom.uid import generate_uid

IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["ainode"])
"""Stable, under pydicom's UID root (no organisation root of our own)."""
IMPLEMENTATION_VERSION_NAME = f"AINODE_{version('ainode')}"[:16]
