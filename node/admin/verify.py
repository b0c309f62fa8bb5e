"""`ainode verify`: every stored instance file against the catalog. Missing (a row without
its file), unrecorded (a file without a row), changed (not the size the catalog recorded) and
mislabelled (a file whose SOP Instance UID is not its name's) are listed; nothing is changed.

Rows are read once into memory (a path and a size: about 150 bytes each) and the files are
walked once, so a store of millions of instances is checked in one pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine, select

from node.store.db.models import Instance
from node.store.storage import InstanceStore


@dataclass
class Verification:
    """What `verify_store` found; paths relative to the store's root."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    mislabelled: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unrecorded or self.changed or self.mislabelled)


def verify_store(engine: Engine, store: InstanceStore) -> Verification:
    """Check every catalogued instance and every instance file against each other."""
    with engine.connect() as conn:
        rows = conn.execute(select(Instance.path, Instance.size_bytes))
        sizes: dict[str, int] = {path: size for path, size in rows}
    found = Verification()
    for series_files in store.series_files():
        for path in series_files:
            relative = str(path.relative_to(store.root))
            found.checked += 1
            size = sizes.pop(relative, None)
            if size is None:
                found.unrecorded.append(relative)
            elif path.stat().st_size != size:
                found.changed.append(relative)
            elif _stored_uid(path) != path.stem:
                found.mislabelled.append(relative)
    found.missing = sorted(sizes)
    return found


def _stored_uid(path: Path) -> str | None:
    """The SOP Instance UID the file holds (None when its header cannot be read)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except (InvalidDicomError, OSError, ValueError):
        return None
    return str(header.get("SOPInstanceUID", "")) or None
