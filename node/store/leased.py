"""One leased queue for every kind of durable work: jobs, dispatches, fetches and notifications
(rows with the `LeasedWork` columns), and one loop that consumes it (`LeasedWorkLoop`, with
`renewing` for work that outlasts a lease).

A consumer claims the most urgent due rows atomically (PostgreSQL: FOR UPDATE SKIP LOCKED;
SQLite: the engine's BEGIN IMMEDIATE) and holds each with a lease it renews. It records the
outcome only while it still holds the lease. A row whose lease expired goes back to the queue
(or dies if that was its last attempt). Failures retry with exponential backoff and jitter up
to the row's `max_attempts`, then go `dead`; errors that a retry cannot fix go straight to
`failed`.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import ColumnElement, Connection, Engine, Update, select, update

from node.store.db.models import Dispatch, Fetch, Job, Notification, WorkState, utcnow

LeasedTable = type[Job] | type[Dispatch] | type[Fetch] | type[Notification]
View = TypeVar("View")
Row = TypeVar("Row")

log = logging.getLogger(__name__)


class Retries(Protocol):
    """A config section that says how its work retries (`workers`, `dispatch`)."""

    @property
    def max_attempts(self) -> int: ...
    @property
    def retry_base_seconds(self) -> float: ...
    @property
    def retry_max_seconds(self) -> float: ...


DUE = (WorkState.QUEUED, WorkState.RETRYING)
FINISHED = (WorkState.SUCCEEDED, WorkState.FAILED, WorkState.DEAD, WorkState.CANCELLED)
ERROR_LENGTH = 4000


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_seconds: float = 5.0
    max_seconds: float = 600.0

    @classmethod
    def of(cls, settings: Retries) -> RetryPolicy:
        return cls(settings.max_attempts, settings.retry_base_seconds, settings.retry_max_seconds)

    def delay(self, attempts: int) -> float:
        """Exponential backoff with ±25 % jitter, so failures do not retry in lockstep."""
        raw = min(self.max_seconds, self.base_seconds * 2 ** max(0, attempts - 1))
        return raw * random.uniform(0.75, 1.25)


def queued(max_attempts: int, now: datetime) -> dict[str, object]:
    """The leased columns of a new row: queued, due at `now`, no attempt made yet."""
    return {
        "state": WorkState.QUEUED,
        "attempts": 0,
        "max_attempts": max_attempts,
        "run_after": now,
        "created_at": now,
    }


def newest(
    engine: Engine,
    table: LeasedTable,
    view: type[View],
    limit: int,
    **decode: Callable[[Any], Any],
) -> list[View]:
    """The newest rows of `table` as `view`, a dataclass whose fields are columns (each field
    in `decode` converted on the way, e.g. JSON text to a dict)."""
    names = [field.name for field in fields(view)]  # type: ignore[arg-type]
    statement = select(*(getattr(table, name) for name in names))
    with engine.connect() as conn:
        rows = conn.execute(statement.order_by(table.id.desc()).limit(limit)).mappings()
        return [
            view(**{name: decode.get(name, _same)(row[name]) for name in names}) for row in rows
        ]


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Lease:
    """A claimed row: its id and which attempt this is."""

    id: int
    attempt: int
    max_attempts: int


class LeasedQueue:
    """Claim, renew, finish, retry and cancel rows of one leased table."""

    def __init__(self, engine: Engine, table: LeasedTable, policy: RetryPolicy):
        self._engine = engine
        self.table = table
        self.policy = policy
        self._skip_locked = engine.dialect.name == "postgresql"

    def claim(
        self,
        conn: Connection,
        owner: str,
        lease_seconds: float,
        limit: int = 1,
        where: ColumnElement[bool] | None = None,
    ) -> list[Lease]:
        """Lease up to `limit` due rows (of those `where` selects), most urgent (lowest
        priority value) first, in the caller's transaction."""
        table, now = self.table, utcnow()
        candidates = (
            select(table.id)
            .where(table.state.in_(DUE), table.run_after <= now)
            .order_by(table.priority, table.run_after, table.id)
            .limit(limit)
        )
        if where is not None:
            candidates = candidates.where(where)
        if self._skip_locked:
            candidates = candidates.with_for_update(skip_locked=True)
        ids = list(conn.execute(candidates).scalars())
        if not ids:
            return []
        claimed = conn.execute(
            update(table)
            .where(table.id.in_(ids), table.state.in_(DUE))
            .values(
                state=WorkState.RUNNING,
                attempts=table.attempts + 1,
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                started_at=now,
                error=None,
            )
            .returning(table.id, table.attempts, table.max_attempts)
        ).all()
        order = {row_id: index for index, row_id in enumerate(ids)}
        leases = [Lease(row_id, attempts, most) for row_id, attempts, most in claimed]
        return sorted(leases, key=lambda lease: order[lease.id])

    def renew(self, row_id: int, owner: str, lease_seconds: float) -> bool:
        """Extend the lease; False if the row is no longer ours (expired, cancelled)."""
        with self._engine.begin() as conn:
            expires = utcnow() + timedelta(seconds=lease_seconds)
            renewed = conn.execute(self.owned(row_id, owner).values(lease_expires_at=expires))
            return bool(renewed.rowcount)

    def succeed(self, conn: Connection, row_id: int, owner: str, **values: object) -> bool:
        """Mark a leased row succeeded (with `values`) in the caller's transaction; False
        when the lease was lost."""
        return bool(
            conn.execute(
                self.owned(row_id, owner).values(
                    state=WorkState.SUCCEEDED,
                    finished_at=utcnow(),
                    lease_owner=None,
                    lease_expires_at=None,
                    **values,
                )
            ).rowcount
        )

    def fail(
        self, row_id: int, owner: str, error: str, permanent: bool, **values: object
    ) -> WorkState | None:
        """Record a failure: `failed` if permanent, `dead` after the last attempt, else
        `retrying` after the policy's delay. None when the lease was lost."""
        return self._failed(self.owned(row_id, owner), row_id, error, permanent, **values)

    def wait(
        self, conn: Connection, row_id: int, owner: str, until: datetime, **values: object
    ) -> bool:
        """Settle a leased row as waiting for a peer's answer until `until` (with `values`),
        in the caller's transaction; False when the lease was lost."""
        return bool(
            conn.execute(
                self.owned(row_id, owner).values(
                    state=WorkState.WAITING,
                    run_after=until,
                    lease_owner=None,
                    lease_expires_at=None,
                    **values,
                )
            ).rowcount
        )

    def overdue(self, *columns: Any) -> list[Any]:
        """The waiting rows whose time is up (or whose answer was a failure): their id and
        `columns`."""
        table = self.table
        with self._engine.connect() as conn:
            return list(
                conn.execute(
                    select(table.id, *columns).where(
                        table.state == WorkState.WAITING, table.run_after <= utcnow()
                    )
                ).all()
            )

    def give_up_waiting(self, row_id: int, error: str, **values: object) -> WorkState | None:
        """A waiting row's answer failed or never came: retried, or dead after its last
        attempt. None when it no longer waits (answered, cancelled meanwhile)."""
        waiting = update(self.table).where(
            self.table.id == row_id, self.table.state == WorkState.WAITING
        )
        return self._failed(waiting, row_id, error, permanent=False, **values)

    def _failed(
        self, change: Update, row_id: int, error: str, permanent: bool, **values: object
    ) -> WorkState | None:
        table, now = self.table, utcnow()
        with self._engine.begin() as conn:
            attempts, max_attempts = conn.execute(
                select(table.attempts, table.max_attempts).where(table.id == row_id)
            ).one()
            if permanent:
                state, run_after = WorkState.FAILED, now
            elif attempts >= max_attempts:
                state, run_after = WorkState.DEAD, now
            else:
                state = WorkState.RETRYING
                retried_at = max(0, max_attempts - self.policy.max_attempts)  # a retry's count
                this_set = attempts - retried_at
                run_after = now + timedelta(seconds=self.policy.delay(this_set))
            changed = conn.execute(
                change.values(
                    state=state,
                    error=error[:ERROR_LENGTH],
                    run_after=run_after,
                    finished_at=now if state != WorkState.RETRYING else None,
                    lease_owner=None,
                    lease_expires_at=None,
                    **values,
                )
            ).rowcount
        return state if changed else None

    def requeue_expired(self) -> int:
        """Rows whose consumer died (lease expired) go back to the queue, or die if out of
        tries."""
        table, now = self.table, utcnow()
        expired = (table.state == WorkState.RUNNING) & (table.lease_expires_at < now)
        released = {"lease_owner": None, "lease_expires_at": None}
        with self._engine.begin() as conn:
            dead = conn.execute(
                update(table)
                .where(expired, table.attempts >= table.max_attempts)
                .values(
                    state=WorkState.DEAD,
                    error="consumer lost (lease expired) on the last attempt",
                    finished_at=now,
                    **released,
                )
            ).rowcount
            requeued = conn.execute(
                update(table)
                .where(expired)
                .values(
                    state=WorkState.RETRYING,
                    error="consumer lost (lease expired)",
                    run_after=now,
                    **released,
                )
            ).rowcount
        return dead + requeued

    def requeue_running(self) -> int:
        """Every running row goes back to the queue at once: for a consumer that is the only
        one of its kind, at its start (what it left running, it no longer runs)."""
        table = self.table
        with self._engine.begin() as conn:
            return conn.execute(
                update(table)
                .where(table.state == WorkState.RUNNING)
                .values(
                    state=WorkState.RETRYING,
                    run_after=utcnow(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount

    def retry(self, row_id: int) -> bool:
        """Run a row that is not running again, with a fresh set of the policy's attempts;
        its count of attempts goes on (its history: how often it ran)."""
        table = self.table
        with self._engine.begin() as conn:
            return bool(
                conn.execute(
                    update(table)
                    .where(table.id == row_id, table.state != WorkState.RUNNING)
                    .values(
                        state=WorkState.QUEUED,
                        max_attempts=table.attempts + self.policy.max_attempts,
                        run_after=utcnow(),
                        finished_at=None,
                    )
                ).rowcount
            )

    def cancel(self, row_id: int) -> bool:
        """Cancel a row that has not finished; a running one loses its lease."""
        table = self.table
        with self._engine.begin() as conn:
            return bool(
                conn.execute(
                    update(table)
                    .where(table.id == row_id, table.state.not_in(FINISHED))
                    .values(
                        state=WorkState.CANCELLED,
                        finished_at=utcnow(),
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                ).rowcount
            )

    def owned(self, row_id: int, owner: str) -> Update:
        """An update of the row, effective only while `owner` holds its lease."""
        table = self.table
        return update(table).where(
            table.id == row_id, table.state == WorkState.RUNNING, table.lease_owner == owner
        )


@dataclass(frozen=True)
class Held(Generic[Row]):
    """A claimed row as its consumer loaded it, and the lease it holds it by."""

    lease: Lease
    row: Row


class LeasedWorkLoop(Generic[Row]):
    """claim -> load -> handle -> settle, the loop of every consumer of a leased queue
    (dispatcher, notifier, fetcher; the worker claims with its own batching).

    `run_due` claims up to `batch` due rows and loads them in one transaction, then handles
    each (on `threads` threads when more than one). A handler settles its row with `succeed`
    or `fail`; one that raises has its row retried, with the error recorded, so a bug never
    leaves a row waiting for its lease to expire."""

    kind = "work"
    """What a row is, for log lines (`dispatch`, `notification`, `fetch`)."""

    def __init__(
        self,
        engine: Engine,
        queue: LeasedQueue,
        owner: str,
        lease_seconds: float,
        batch: int,
        threads: int = 1,
    ) -> None:
        self._engine = engine
        self.queue = queue
        self.owner = owner
        self.lease_seconds = lease_seconds
        self._batch = batch
        self._pool = (
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix=self.kind)
            if threads > 1
            else None
        )

    def load(self, conn: Connection, leases: list[Lease]) -> list[Held[Row]]:
        """The claimed rows as the handler needs them, read in the claim's transaction."""
        raise NotImplementedError

    def handle(self, held: Held[Row]) -> None:
        """Do the work of one row and settle it (`succeed` or `fail`)."""
        raise NotImplementedError

    def run_due(self) -> int:
        """Claim, load and handle what is due; how many rows were handled."""
        with self._engine.begin() as conn:
            leases = self.queue.claim(conn, self.owner, self.lease_seconds, limit=self._batch)
            claimed = self.load(conn, leases) if leases else []
        if self._pool is None:
            for held in claimed:
                self._handle(held)
        else:
            list(self._pool.map(self._handle, claimed))
        return len(claimed)

    def succeed(self, lease: Lease, **values: object) -> bool:
        """Settle a row as done; False (and a warning) when its lease was lost meanwhile."""
        with self._engine.begin() as conn:
            kept = self.queue.succeed(conn, lease.id, self.owner, **values)
        if not kept:
            log.warning("%s %d finished after losing its lease", self.kind, lease.id)
        return kept

    def fail(self, lease: Lease, error: str, permanent: bool) -> WorkState | None:
        """Settle a row as failed: retried later, unless `permanent` or out of attempts."""
        return self.queue.fail(lease.id, self.owner, error, permanent=permanent)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _handle(self, held: Held[Row]) -> None:
        try:
            self.handle(held)
        except Exception as exc:  # a handler's bug: the row is retried, the loop goes on
            log.exception("%s %d: unexpected error", self.kind, held.lease.id)
            self.fail(held.lease, f"{type(exc).__name__}: {exc}", permanent=False)


@contextmanager
def renewing(
    queue: LeasedQueue, ids: list[int], owner: str, lease_seconds: float, kind: str
) -> Iterator[None]:
    """Renew the leases of `ids` every third of `lease_seconds` while the block runs (a
    consumer that dies stops renewing, and its rows go back to the queue). A lease lost to a
    cancel or an expiry is logged and no longer renewed."""
    stop = threading.Event()
    held = list(ids)

    def renew() -> None:
        while held and not stop.wait(lease_seconds / 3):
            for row_id in list(held):
                if not queue.renew(row_id, owner, lease_seconds):
                    log.warning("%s %d: lease lost (cancelled or expired)", kind, row_id)
                    held.remove(row_id)

    thread = threading.Thread(target=renew, name="lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
