"""`ainode verify`: every stored instance file against the catalog. Missing (a row without
its file), unrecorded (a file without a row), changed (not the size or, unless `quick`, the
SHA-256 the catalog recorded) and mislabelled (a file whose SOP Instance UID is not its
name's) are listed; nothing is changed. Rows recorded before hashes were (schema 0018) are
checked by size, and counted.

Rows are read once into memory (a path, a size and a hash: about 230 bytes each) and the files
are walked once, so a store of millions of instances is checked in one pass; `quick` skips
reading every byte."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine, select

from node.store.db.models import Instance
from node.store.storage import InstanceStore, file_hash


@dataclass
class Verification:
    """What `verify_store` found; paths relative to the store's root."""

    checked: int = 0
    unhashed: int = 0
    """Files whose row has no hash (recorded by an older version): checked by size only."""
    missing: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    mislabelled: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unrecorded or self.changed or self.mislabelled)


def verify_store(engine: Engine, store: InstanceStore, quick: bool = False) -> Verification:
    """Check every catalogued instance and every instance file against each other."""
    with engine.connect() as conn:
        rows = conn.execute(select(Instance.path, Instance.size_bytes, Instance.sha256))
        recorded: dict[str, tuple[int, str | None]] = {
            path: (size, digest) for path, size, digest in rows
        }
    found = Verification()
    for series_files in store.series_files():
        for path in series_files:
            relative = str(path.relative_to(store.root))
            found.checked += 1
            row = recorded.pop(relative, None)
            if row is None:
                found.unrecorded.append(relative)
                continue
            size, digest = row
            found.unhashed += digest is None
            if path.stat().st_size != size or not (quick or digest in (None, file_hash(path))):
                found.changed.append(relative)
            elif _stored_uid(path) != path.stem:
                found.mislabelled.append(relative)
    found.missing = sorted(recorded)
    return found


def _stored_uid(path: Path) -> str | None:
    """The SOP Instance UID the file holds (None when its header cannot be read)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except (InvalidDicomError, OSError, ValueError):
        return None
    return str(header.get("SOPInstanceUID", "")) or None
