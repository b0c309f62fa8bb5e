"""After an unclean stop or an operating-system restart, re-record stored instances that have
no database row.

The receive path flushes every instance file and its directory entry before it answers success.
A file whose row is missing is one of two kinds: written but not yet recorded when the node
was killed (never acknowledged, but whole), or recorded by a SQLite commit that a power loss
rolled back (`make_engine(flush_commits=False)`: a commit survives a crash of the node, not a
power loss). The files are the record. On start after an unclean stop (on any database), or
when the machine has booted since the node last checked (SQLite: its boot id differs from the
one kept beside the database), every stored file without a row is recorded again, as if
delivered by one released association, so its series completes and is routed as usual.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine, select

from node.ingest.metadata import InstanceMetadata
from node.store.catalog import Catalog, Receipt
from node.store.db.engine import sqlite_file
from node.store.db.models import Instance
from node.store.storage import InstanceStore, InvalidUID, file_hash

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
RECOVERY_AE = "RECOVERY"
_QUERY_CHUNK = 500


def recover_after_restart(
    engine: Engine, store: InstanceStore, catalog: Catalog, node_ae: str, unclean: bool = False
) -> int | None:
    """Re-record unrecorded files after an `unclean` stop, or if the machine restarted since
    the last check of a SQLite catalog; return how many were recorded, or None when no check
    was needed."""
    marker = boot_marker(engine)
    boot = current_boot_id()
    rebooted = marker is not None and not (
        boot is not None and marker.exists() and marker.read_text().strip() == boot
    )
    if not (unclean or rebooted):
        return None
    recorded = rerecord_unrecorded(engine, store, catalog, node_ae)
    if marker is not None and boot is not None:
        marker.write_text(boot + "\n")
    return recorded


def boot_marker(engine: Engine) -> Path | None:
    """Where the boot id of the last check is kept: beside a SQLite database file."""
    database = sqlite_file(engine.url)
    return None if database is None else Path(f"{database}.boot-id")


def current_boot_id() -> str | None:
    """This boot's id (Linux), or None where the system does not say."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def rerecord_unrecorded(
    engine: Engine,
    store: InstanceStore,
    catalog: Catalog,
    node_ae: str,
    written: tuple[float, float] | None = None,
) -> int:
    """Record every stored instance file that has no row (with `written`, only the files
    written in that span of time); return how many were."""
    started = time.monotonic()
    association_id = uuid.uuid4().hex
    opened = False
    checked = recorded = 0
    for series_files in store.series_files(written[0] if written else None):
        if written is not None:
            series_files = [p for p in series_files if _written_in(p, written)]
        missing = _unrecorded(engine, series_files)
        checked += len(series_files)
        for path in missing:
            loaded = _load(store, path)
            if loaded is None:
                continue
            if not opened:
                catalog.open_association(association_id, RECOVERY_AE, node_ae, None)
                opened = True
            meta, calling_ae, transfer_syntax = loaded
            stat = path.stat()
            receipt = Receipt(
                association_id=association_id,
                calling_ae=calling_ae,
                called_ae=node_ae,
                transfer_syntax_uid=transfer_syntax,
                size_bytes=stat.st_size,
                received_at=datetime.fromtimestamp(stat.st_mtime, UTC),
                sha256=file_hash(path),
            )
            catalog.record_instance(meta, receipt, content_changed=True, link=True)
            recorded += 1
    if opened:
        catalog.close_association(association_id, released=True, instances=recorded)
    log.log(
        logging.WARNING if recorded else logging.INFO,
        "%s: %d stored instances, %d re-recorded from their files (%.1f s)",
        "restart check" if written is None else "check after a receiver's crash",
        checked,
        recorded,
        time.monotonic() - started,
    )
    return recorded


def _written_in(path: Path, span: tuple[float, float]) -> bool:
    try:
        return span[0] <= path.stat().st_mtime <= span[1]
    except OSError:  # removed meanwhile (retention)
        return False


def _unrecorded(engine: Engine, files: list[Path]) -> list[Path]:
    """The files of one series whose SOP Instance UID has no row."""
    by_uid = {path.stem: path for path in files}
    uids = list(by_uid)
    known: set[str] = set()
    with engine.connect() as conn:
        for start in range(0, len(uids), _QUERY_CHUNK):
            chunk = uids[start : start + _QUERY_CHUNK]
            query = select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(chunk))
            known.update(conn.scalars(query))
    return [path for uid, path in by_uid.items() if uid not in known]


def _load(store: InstanceStore, path: Path) -> tuple[InstanceMetadata, str, str] | None:
    """The metadata, sender and transfer syntax of a stored file, or None (logged) if it
    cannot be re-recorded."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        meta = InstanceMetadata.from_dataset(ds)
    except (InvalidDicomError, InvalidUID, OSError, ValueError) as exc:
        log.error("restart check: %s cannot be re-recorded: %s", path, exc)
        return None
    if store.path_of(meta.key) != path:
        log.error("restart check: %s holds instance %s of another series", path, meta.key)
        return None
    file_meta = ds.file_meta
    calling_ae = str(file_meta.get("SourceApplicationEntityTitle", "") or RECOVERY_AE).strip()
    return meta, calling_ae, str(file_meta.get("TransferSyntaxUID", ""))
