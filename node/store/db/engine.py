"""Engine and session factory: SQLite in WAL mode with immediate write transactions,
PostgreSQL by URL.

A SQLite commit is flushed to disk before it returns (`synchronous=FULL`), except on the receive
path's engine (`flush_commits=False`, `synchronous=NORMAL`): there a commit survives a crash of
the node but not a power loss, and the instance files, flushed before each acknowledgement, are
the record the catalog is rebuilt from after one (`node.ingest.recovery`).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection

BUSY_TIMEOUT_SECONDS = 30.0

_UNCLOSED: list[sqlite3.Connection] = []
"""SQLite connections found unwritable at checkout, never closed: the node stops and exits
without finalizers (`node.service.serve`)."""


def make_engine(
    url: str, flush_commits: bool = True, busy_timeout: float = BUSY_TIMEOUT_SECONDS
) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE, and
    `flush_commits=False` leaves the disk flush to WAL checkpoints. `busy_timeout` bounds how
    long a statement waits for a lock (SQLite) or a connection (PostgreSQL)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = sqlite_file(parsed)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": busy_timeout}, hide_parameters=True)
        _configure_sqlite(engine, "FULL" if flush_commits else "NORMAL", busy_timeout)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        hide_parameters=True,  # a failed statement's error quotes no patient ID
        pool_size=5,
        max_overflow=10,
        pool_timeout=busy_timeout,
        connect_args={"connect_timeout": max(1, round(busy_timeout))},
    )


class DatabaseNotWritable(OSError):
    """A SQLite file the node must write cannot be opened for writing."""


def check_writable(url: URL) -> None:
    """Raise DatabaseNotWritable when a SQLite database file (or its WAL or shared-memory
    file) cannot be written, e.g. made immutable: written to, its shared memory would kill
    the process with SIGBUS.

    Asked with access(2), never by opening the file: closing any descriptor of a file drops
    every POSIX lock this process holds on it, SQLite's included, and another process could
    then write beside a transaction of ours (a corrupt database)."""
    database = sqlite_file(url)
    if database is None:
        return
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        if path.exists() and not os.access(path, os.W_OK):
            raise DatabaseNotWritable(
                f"{path} cannot be opened for writing (immutable or read-only?)"
            )


def sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL; None for another backend or an in-memory one."""
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def _configure_sqlite(engine: Engine, synchronous: str, busy_timeout: float) -> None:
    database = sqlite_file(engine.url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        if database is not None:
            check_writable(engine.url)  # before SQLite maps its shared memory (see checkout)
        # Let SQLAlchemy's "begin" event open transactions itself (pysqlite defers BEGIN).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={round(busy_timeout * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    if database is not None:

        @event.listens_for(engine, "checkout")
        def _on_checkout(
            dbapi_connection: sqlite3.Connection, _record: object, proxy: PoolProxiedConnection
        ) -> None:
            # SQLite reaches its shared memory through a map: once its files are immutable
            # or read-only, the next statement may fault (SIGBUS, mid-association). A
            # connection is handed out only while they can be written; else the caller
            # gets DatabaseNotWritable, an error it can answer, and the connection is kept
            # out of the pool, unclosed: the pool would close it, and closing writes through
            # that map too.
            try:
                check_writable(engine.url)
            except DatabaseNotWritable:
                _UNCLOSED.append(dbapi_connection)
                proxy.detach()
                raise

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Take the write lock up front: several processes write, and a deferred
        # transaction that later upgrades to a writer can fail instead of waiting.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
