"""Durable instance storage: temp file, fsync, atomic rename into
``<root>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``.

A file is either absent or complete: it is written under ``<root>/.incoming/`` on the same
filesystem, flushed to disk, then renamed into place and its directory entry synced. UIDs
are validated before they become path parts.

Instances stored at the same time by several associations mostly land in one series folder:
one directory flush then covers all of their renames (`DirectorySync`).
"""

from __future__ import annotations

import enum
import errno
import hashlib
import itertools
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_LENGTH = 64
INCOMING_DIR = ".incoming"
RUNNING_MARKER = ".running"
"""Present while a node runs on the store: found at start, it tells of an unclean stop."""
KNOWN_FOLDERS = 1024  # series folders remembered, to skip checking that they exist
MAX_HEADER_BYTES = 1024
"""The preamble and file meta group the node writes are well below this."""


class InvalidUID(ValueError):
    """A UID that is not a DICOM UID and must never become a path part."""


class StorageFull(OSError):
    """No space (or quota) left for a new instance."""


class StorageError(OSError):
    """The instance could not be written for another I/O reason."""


def check_uid(value: object, keyword: str) -> str:
    """Return `value` as a UID string, or raise :class:`InvalidUID` naming the attribute."""
    text = str(value).strip("\0 ") if value is not None else ""
    if not text:
        raise InvalidUID(f"{keyword} is missing or empty")
    if len(text) > MAX_UID_LENGTH or not _UID.fullmatch(text):
        raise InvalidUID(f"{keyword} is not a valid UID: {text[:80]!r}")
    return text


class WriteOutcome(enum.Enum):
    """What a write did to the store."""

    CREATED = "created"
    IDENTICAL = "identical"  # same bytes already stored: nothing written
    DIFFERS = "differs"  # same SOP Instance UID, other bytes: nothing written, the first stays


@dataclass(frozen=True)
class InstanceKey:
    """The three UIDs that place an instance in the store (validated)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str

    @classmethod
    def validated(cls, study_uid: object, series_uid: object, sop_uid: object) -> InstanceKey:
        return cls(
            check_uid(study_uid, "StudyInstanceUID"),
            check_uid(series_uid, "SeriesInstanceUID"),
            check_uid(sop_uid, "SOPInstanceUID"),
        )

    @property
    def relative_path(self) -> Path:
        return Path(self.study_uid, self.series_uid, f"{self.sop_instance_uid}.dcm")


class InstanceStore:
    """The on-disk layout of received instances."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._incoming = root / INCOMING_DIR
        self._directories = DirectorySync()
        self._known_folders: set[Path] = set()  # series folders this process made or found
        self._temp_prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # unique per process
        self._temp_numbers = itertools.count()

    def prepare(self) -> None:
        """Create the root and clear temp files left by a crash (never acknowledged)."""
        self._incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self._incoming.iterdir():
            leftover.unlink(missing_ok=True)

    def clear_temp_files_of(self, pid: int) -> int:
        """Remove the temp files a process that died left (never acknowledged)."""
        leftovers = list(self._incoming.glob(f"{pid}-*"))
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        return len(leftovers)

    def mark_running(self) -> bool:
        """Note that a node runs on this store; True when the last one did not stop cleanly
        (its note is still there)."""
        marker = self.root / RUNNING_MARKER
        unclean = marker.exists()
        marker.write_text(f"{os.getpid()}\n")
        return unclean

    def mark_stopped(self) -> None:
        (self.root / RUNNING_MARKER).unlink(missing_ok=True)

    def derived_of(self, study_uid: str, series_uid: str) -> Path:
        """Where what the pipelines derive from a series lives (beside the study's files, so
        retention removes both together): their results, the lung masks they share."""
        study = check_uid(study_uid, "StudyInstanceUID")
        series = check_uid(series_uid, "SeriesInstanceUID")
        return self.root / study / "results" / series

    def results_of(self, study_uid: str, series_uid: str, revision: int, pipeline: str) -> Path:
        """Where a pipeline's result for a series revision lives."""
        if not pipeline.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"pipeline name {pipeline!r} cannot be a folder name")
        return self.derived_of(study_uid, series_uid) / f"r{revision}-{pipeline}"

    def free_mb(self) -> float:
        """Space left to an unprivileged writer on the store's filesystem, in MB (on the
        filesystem it will be made on, before it exists)."""
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        stats = os.statvfs(existing)
        return stats.f_bavail * stats.f_frsize / 1e6

    def path_of(self, key: InstanceKey) -> Path:
        return self.root / key.relative_path

    def series_files(self, changed_since: float | None = None) -> Iterator[list[Path]]:
        """The stored instance files, one list per series folder (results and temp files
        are not instances); with `changed_since` (a time), only the folders where a file
        has arrived since then."""
        for study in _uid_folders(self.root):
            for series in _uid_folders(study):
                if changed_since is not None and series.stat().st_mtime < changed_since:
                    continue
                files = [p for p in series.iterdir() if p.suffix == ".dcm" and _UID.match(p.stem)]
                if files:
                    yield files

    def spool(self) -> BinaryIO:
        """An unnamed file beside the store, for a STOW-RS part as it arrives: on the same
        file system (the kernel copies it into place), gone when closed or on a crash."""
        return tempfile.TemporaryFile(dir=self._incoming)

    def write(self, key: InstanceKey, chunks: tuple[Chunk, ...]) -> WriteOutcome:
        """Durably store an encoded file made of `chunks`, never over another one of the same
        instance (what a sender acknowledged stays what is served); raise StorageFull or
        StorageError."""
        final = self.path_of(key)
        if final.exists():
            return WriteOutcome.IDENTICAL if _same_content(final, chunks) else WriteOutcome.DIFFERS
        temp = self._incoming / f"{self._temp_prefix}-{next(self._temp_numbers)}.part"
        try:
            _write_synced(temp, chunks)
            created_dirs = self._move_into_place(temp, final)
            self._directories.sync(final.parent, *(d.parent for d in created_dirs))
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise _classify(exc) from exc
        return WriteOutcome.CREATED

    def _move_into_place(self, temp: Path, final: Path) -> list[Path]:
        """Rename `temp` to `final`, first creating the folders this process has not seen
        (or that retention removed since); return the folders created."""
        folder = final.parent
        if folder in self._known_folders:
            try:
                os.replace(temp, final)
                return []
            except FileNotFoundError:
                self._known_folders.discard(folder)
        created = _make_dirs(folder, self.root)
        os.replace(temp, final)
        if len(self._known_folders) >= KNOWN_FOLDERS:
            self._known_folders.clear()
        self._known_folders.add(folder)
        return created

    def remove(self, key: InstanceKey) -> None:
        """Remove a stored instance (used to undo a write the database refused)."""
        self.path_of(key).unlink(missing_ok=True)


@dataclass
class _Flush:
    """One round of directory flushes, and what failed in it."""

    directories: set[Path] = field(default_factory=set)
    finished: bool = False
    errors: dict[Path, OSError] = field(default_factory=dict)


class DirectorySync:
    """Directory flushes shared by concurrent writers (group commit for renames).

    A caller's renames are durable once a flush of their directories has *started* after
    them. Callers that arrive while a round of flushes runs join the next round; when the
    running one ends, the first of them runs it, flushing each queued directory once, for
    all. A caller fails only if one of its own directories could not be flushed.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next = _Flush()
        self._flushing = False

    def sync(self, *directories: Path) -> None:
        with self._condition:
            flush = self._next
            flush.directories.update(directories)
            while self._flushing and not flush.finished:
                self._condition.wait()
            leading = not flush.finished
            if leading:
                self._flushing = True
                self._next = _Flush()
        if leading:
            try:
                for directory in flush.directories:
                    try:
                        _fsync_dir(directory)
                    except OSError as exc:
                        flush.errors[directory] = exc
            finally:
                with self._condition:
                    flush.finished = True
                    self._flushing = False
                    self._condition.notify_all()
        for directory in directories:
            if directory in flush.errors:
                raise flush.errors[directory]


def _uid_folders(parent: Path) -> Iterator[Path]:
    return (p for p in parent.iterdir() if _UID.match(p.name) and p.is_dir())


def _same_content(path: Path, chunks: tuple[Chunk, ...]) -> bool:
    """Whether the stored file ends with the same dataset (the last chunk): the file meta
    before it names who sent it, which is not content (the same instance re-sent by a PACS
    after a C-MOVE, then fetched by C-GET, is the same instance)."""
    dataset = chunks[-1]
    size = path.stat().st_size
    if size < len(dataset) or size > len(dataset) + MAX_HEADER_BYTES:
        return False
    with path.open("rb") as file:
        file.seek(size - len(dataset))
        for start in range(0, len(dataset), COMPARE_STEP):
            end = min(start + COMPARE_STEP, len(dataset))
            if isinstance(dataset, FileRegion):
                theirs: bytes | memoryview = dataset.read(start, end - start)
            else:
                theirs = memoryview(dataset)[start:end]
            if file.read(end - start) != theirs:
                return False
        return True


def content_hash(chunks: tuple[Chunk, ...]) -> str:
    """The SHA-256 of a file made of `chunks` (hex), as `file_hash` reads it back."""
    digest = hashlib.sha256()
    for chunk in chunks:
        if isinstance(chunk, FileRegion):
            for start in range(0, len(chunk), COMPARE_STEP):
                digest.update(chunk.read(start, min(COMPARE_STEP, len(chunk) - start)))
        else:
            digest.update(chunk)
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    """The SHA-256 of a stored file (hex)."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _write_synced(path: Path, chunks: tuple[Chunk, ...]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for chunk in chunks:
            if isinstance(chunk, FileRegion):
                chunk.copy_to(fd)
                continue
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class FileRegion:
    """Bytes of an open file that the kernel copies (a spooled STOW-RS part's dataset): a
    large instance costs no memory on its way into the store."""

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length

    def copy_to(self, target: int) -> None:
        """Append the region to the file open as `target`."""
        offset, left = self.offset, self.length
        while left:
            copied = os.copy_file_range(self.fd, target, min(left, COPY_STEP), offset)
            if copied == 0:
                raise OSError(errno.EIO, "the spooled file ended early")
            offset += copied
            left -= copied

    def read(self, start: int, size: int) -> bytes:
        return os.pread(self.fd, size, self.offset + start)


Chunk = bytes | memoryview | FileRegion
COPY_STEP = 64 << 20
COMPARE_STEP = 8 << 20


def _make_dirs(directory: Path, root: Path) -> list[Path]:
    """Create `directory` and missing parents below `root`; return the ones created."""
    missing = []
    current = directory
    while current != root and not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _classify(exc: OSError) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(exc.errno, f"storage full: {exc.strerror}")
    return StorageError(exc.errno, f"storage I/O error: {exc.strerror}")
