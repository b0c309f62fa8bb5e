"""A SQLite database made immutable under a running engine: the next checkout answers
DatabaseNotWritable and the process lives on. The pool would close the refused connection,
and closing the last one checkpoints through the shared memory that now faults (SIGBUS): the
check runs in a child process, whose death the test would see."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CHILD = textwrap.dedent(
    """
    import subprocess, sys
    from sqlalchemy import text
    from node.store.db.engine import DatabaseNotWritable, make_engine

    database = sys.argv[1]
    engine = make_engine(f"sqlite:///{database}")
    with engine.begin() as conn:  # WAL and shared memory mapped; the connection pooled
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    files = [database, database + "-wal", database + "-shm"]
    if subprocess.run(["chattr", "+i", *files]).returncode != 0:
        print("chattr refused")
        sys.exit(0)
    try:
        engine.connect()
    except DatabaseNotWritable as exc:
        print("refused:", exc, flush=True)
    finally:
        subprocess.run(["chattr", "-i", *files])
    """
)


def test_a_checkout_refused_for_an_immutable_database_does_not_kill_the_process(
    tmp_path: Path,
) -> None:
    database = tmp_path / "ainode.db"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(database)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[4],
    )
    if "chattr refused" in child.stdout:
        pytest.skip("chattr +i is not allowed here")
    assert child.returncode == 0, child.stderr[-2000:]
    assert "refused:" in child.stdout and "cannot be opened for writing" in child.stdout
