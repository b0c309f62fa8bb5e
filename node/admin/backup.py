"""`ainode backup DEST` and `ainode restore SOURCE`: the catalog, the store and the config
together, taken while the node runs.

The catalog is copied first, consistently: SQLite by its online backup API (readers and
writers carry on), PostgreSQL by `pg_dump`. The store follows, file by file, as hard links
where DEST is on the same filesystem (a store's files never change once written: a night's
backup of a 1 TB store costs its directory entries, not 1 TB) and as copies elsewhere, each
listed with its size in `manifest.tsv`. A file is written before its row, so every instance
the copied catalog holds is in the copied store; files that arrived since (acknowledged too)
are there without a row, and a restored store is checked on its first start as after an
unclean stop (`node.ingest.recovery`), which records them."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from node.config import Settings
from node.store.db.engine import sqlite_file
from node.store.storage import INCOMING_DIR, RUNNING_MARKER

SQLITE_COPY = "ainode.db"
POSTGRES_DUMP = "ainode.pgdump"
STORE = "storage"
CONFIG = "config"
MANIFEST = "manifest.tsv"


class BackupError(RuntimeError):
    """The backup or restore cannot be made (a reason an operator can act on)."""


@dataclass(frozen=True)
class Copied:
    files: int
    bytes: int
    linked: int
    """Of `files`, how many are hard links (no bytes copied)."""
    vanished: int = 0
    """Files listed but gone when their turn came (retention removed them meanwhile)."""


def backup(settings: Settings, config_files: list[Path], dest: Path) -> Copied:
    """Copy the catalog, then the store, then the config files into `dest` (new or empty)."""
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o700)  # patient data: its owner's alone, whatever the umask
    _copy_catalog(settings.database.url, dest)
    copied = _copy_tree(settings.storage.path, dest / STORE, dest / MANIFEST)
    (dest / CONFIG).mkdir()
    for path in config_files:
        shutil.copy2(path, dest / CONFIG / path.name)
    return copied


def restore(settings: Settings, source: Path) -> Copied:
    """Bring a backup into this config's (empty) database and storage; the store's first
    start then checks it as after an unclean stop."""
    if not (source / MANIFEST).exists():
        raise BackupError(f"{source} is not a backup made by `ainode backup` (no {MANIFEST})")
    storage = settings.storage.path
    if storage.exists() and any(p.name != INCOMING_DIR for p in storage.iterdir()):
        raise BackupError(f"storage {storage} is not empty")
    _restore_catalog(settings.database.url, source)
    copied = _copy_tree(source / STORE, storage, None)
    (storage / RUNNING_MARKER).write_text("restored\n")
    return copied


def rollback(settings: Settings, source: Path) -> Path | None:
    """Put the backup's catalog in place of this config's (a SQLite file is kept beside, as
    `<name>.rolled-back-<time>`, and returned), keep the store (files are only ever added),
    and mark it for the first start's check, which records what arrived since the backup.
    For the version the backup was taken with, after an upgrade that went wrong."""
    parsed = make_url(settings.database.url)
    database = sqlite_file(parsed)
    kept = None
    if database is not None:
        if not (source / SQLITE_COPY).exists():
            raise BackupError(f"{source} holds no SQLite catalog ({SQLITE_COPY})")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        kept = database.with_name(f"{database.name}.rolled-back-{stamp}")
        if database.exists():
            database.rename(kept)
        for suffix in ("-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        shutil.copy2(source / SQLITE_COPY, database)
    else:
        if not (source / POSTGRES_DUMP).exists():
            raise BackupError(f"{source} holds no PostgreSQL dump ({POSTGRES_DUMP})")
        dump = str(source / POSTGRES_DUMP)
        _run_pg("pg_restore", parsed, ["--no-owner", "--clean", "--if-exists", dump])
    settings.storage.path.mkdir(parents=True, exist_ok=True)
    (settings.storage.path / RUNNING_MARKER).write_text("rolled back\n")
    return kept


def _copy_catalog(url: str, dest: Path) -> None:
    parsed = make_url(url)
    database = sqlite_file(parsed)
    if database is not None:
        if not database.exists():
            raise BackupError(f"no database at {database}")
        live, copy = sqlite3.connect(database), sqlite3.connect(dest / SQLITE_COPY)
        with closing(live), closing(copy):
            live.backup(copy)
        return
    if parsed.get_backend_name() != "postgresql":
        raise BackupError(f"cannot back up a {parsed.get_backend_name()} database")
    _run_pg("pg_dump", parsed, ["--format=custom", f"--file={dest / POSTGRES_DUMP}"])


def _restore_catalog(url: str, source: Path) -> None:
    parsed = make_url(url)
    database = sqlite_file(parsed)
    if database is not None:
        if database.exists():
            raise BackupError(f"database {database} exists: restore into a new one")
        if not (source / SQLITE_COPY).exists():
            raise BackupError(f"{source} holds no SQLite catalog ({SQLITE_COPY})")
        database.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / SQLITE_COPY, database)
        return
    if not (source / POSTGRES_DUMP).exists():
        raise BackupError(f"{source} holds no PostgreSQL dump ({POSTGRES_DUMP})")
    _run_pg("pg_restore", parsed, ["--no-owner", "--exit-on-error", str(source / POSTGRES_DUMP)])


def _run_pg(tool: str, url: URL, arguments: list[str]) -> None:
    """`tool` (pg_dump, pg_restore) against the database `url` names, its password passed in
    the environment, never on the command line."""
    if shutil.which(tool) is None:
        raise BackupError(f"{tool} is not installed (PostgreSQL's client tools)")
    command = [tool, f"--host={url.host or 'localhost'}", f"--port={url.port or 5432}"]
    if url.username:
        command.append(f"--username={url.username}")
    command.append(f"--dbname={url.database}")
    environment = {**os.environ, "PGPASSWORD": url.password or ""}
    done = subprocess.run(
        [*command, *arguments], capture_output=True, text=True, env=environment, timeout=3600
    )
    if done.returncode != 0:
        raise BackupError(f"{tool} failed: {done.stderr.strip()[-500:]}")


def _copy_tree(root: Path, dest: Path, manifest: Path | None) -> Copied:
    """Every file under `root` but the store's temp folder and running marker, hard-linked
    into `dest` where it can be, else copied; listed in `manifest` (path, size). A file gone
    by its turn (the node's retention runs meanwhile) is counted, not an error."""
    files = size = linked = vanished = 0
    lines: list[str] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name != INCOMING_DIR]
        for name in names:
            path = Path(folder, name)
            relative = path.relative_to(root)
            if str(relative) == RUNNING_MARKER:
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                was_linked = _link_or_copy(path, target)
                stat = target.stat()
            except FileNotFoundError:
                target.unlink(missing_ok=True)
                vanished += 1
                continue
            linked += was_linked
            files, size = files + 1, size + stat.st_size
            lines.append(f"{relative}\t{stat.st_size}\n")
    if manifest is not None:
        manifest.write_text("".join(lines), encoding="utf-8")
    return Copied(files, size, linked, vanished)


def _link_or_copy(path: Path, target: Path) -> bool:
    """True when hard-linked; copied across filesystems (or where links are refused)."""
    try:
        os.link(path, target)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
    shutil.copy2(path, target)
    return False
