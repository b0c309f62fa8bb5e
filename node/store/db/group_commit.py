"""Group commit: write units from many threads share one transaction, and so one commit.

A commit costs a disk flush (PostgreSQL's WAL flush, SQLite `synchronous=FULL`) or at least
the write lock and a WAL append (SQLite `synchronous=NORMAL`). Units that arrive while a
transaction commits wait for it, then the first of them commits all of them together: with
four associations storing in parallel, one commit acknowledges up to four instances, and one
alone is never delayed. A unit that fails is retried alone, so it fails only itself; when the
database itself fails (locked, unreachable), every unit of the batch fails at once.

Processes writing one SQLite file also take an exclusive `flock` on a file beside it: a process
waiting for it sleeps in the kernel and wakes as it is released, where SQLite's busy handler
polls at 1, 2, 5, 10... ms.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from node.store.db.engine import sqlite_file

T = TypeVar("T")


@dataclass
class _Unit(Generic[T]):
    work: Callable[[Connection], T]
    finished: bool = False
    result: T | None = None
    error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class GroupCommit:
    """Runs `work(connection)` inside a transaction shared with concurrent callers."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._condition = threading.Condition()
        self._pending: list[_Unit[object]] = []
        self._leading = False
        database = sqlite_file(engine.url)
        self._lock_path = None if database is None else Path(f"{database}.writer-lock")

    def run(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in a committed transaction; raise what it raised."""
        unit: _Unit[object] = _Unit(work)
        with self._condition:
            self._pending.append(unit)
            while self._leading and not unit.finished:
                self._condition.wait()
            if unit.finished:
                return unit.outcome()  # type: ignore[return-value]
            self._leading = True
            batch, self._pending = self._pending, []
        try:
            self._commit(batch)
        finally:
            with self._condition:
                self._leading = False
                self._condition.notify_all()
        return unit.outcome()  # type: ignore[return-value]

    def _commit(self, batch: list[_Unit[object]]) -> None:
        try:
            with self._writer_lock(), self._engine.begin() as connection:
                results = [unit.work(connection) for unit in batch]
        except BaseException as exc:
            if len(batch) > 1 and not _database_unavailable(exc):
                for unit in batch:
                    self._commit([unit])
                return
            for unit in batch:  # one unit's fault, or the database's: it fails them all
                unit.error = exc
                unit.finished = True
            return
        for unit, result in zip(batch, results, strict=True):
            unit.result = result
            unit.finished = True

    @contextlib.contextmanager
    def _writer_lock(self) -> Iterator[None]:
        if self._lock_path is None:
            yield
            return
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _database_unavailable(exc: BaseException) -> bool:
    """Locked, unreachable or out of space: a failure of the database, not of one unit, so
    retrying the units one by one would only multiply the wait (statements on the DBAPI
    cursor raise the driver's own errors)."""
    if isinstance(exc, OperationalError | InterfaceError | sqlite3.OperationalError):
        return True
    psycopg = sys.modules.get("psycopg")  # loaded where the database is PostgreSQL
    return psycopg is not None and isinstance(exc, psycopg.OperationalError)
