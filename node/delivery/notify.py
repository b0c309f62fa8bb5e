"""Notifications: an HTTP POST (JSON) when a job of a rule with `notify: [NAME]` ends positive,
failed or done. Queued in the same transaction as the job's end, then sent and retried with
backoff like dispatches: a webhook that is down never holds anything back.

The JSON: event, job, pipeline and version, study and series UIDs, accession number, positive,
findings with probabilities, detections, error (failed), and a link to the node's API.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, select

from node.config import Settings
from node.store.db.models import Notification, WorkState
from node.store.leased import Held, Lease, LeasedQueue, LeasedWorkLoop, RetryPolicy, newest

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0


@dataclass(frozen=True)
class NotificationView:
    """A notification as `ainode status --json` shows it (`notifications` list)."""

    id: int
    job_id: int
    target: str
    event: str
    state: WorkState
    attempts: int
    status: str | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


def list_notifications(engine: Engine, limit: int = 200) -> list[NotificationView]:
    """Newest first."""
    return newest(engine, Notification, NotificationView, limit)


@dataclass(frozen=True)
class Post:
    """A notification taken for posting: to which target, what."""

    target: str
    payload: dict[str, Any]


class Notifier(LeasedWorkLoop[Post]):
    """Claims due notifications and posts them; one per node (the main process)."""

    kind = "notification"

    def __init__(self, engine: Engine, settings: Settings) -> None:
        super().__init__(
            engine,
            LeasedQueue(engine, Notification, RetryPolicy.of(settings.notify)),
            owner=f"notifier-{os.getpid()}",
            lease_seconds=max(LEASE_SECONDS, settings.notify.timeout_seconds * 2),
            batch=8,
        )
        self._settings = settings

    def load(self, conn: Connection, leases: list[Lease]) -> list[Held[Post]]:
        rows = {
            row.id: row
            for row in conn.execute(
                select(Notification.id, Notification.target, Notification.payload).where(
                    Notification.id.in_([lease.id for lease in leases])
                )
            )
        }
        return [
            Held(lease, Post(rows[lease.id].target, json.loads(rows[lease.id].payload)))
            for lease in leases
        ]

    def handle(self, held: Held[Post]) -> None:
        import httpx  # here, not at the top: `ainode status` lists notifications without it

        lease, name, payload = held.lease, held.row.target, held.row.payload
        target = self._settings.notifications.get(name)
        if target is None:
            self.fail(lease, f"notification {name!r} is no longer configured", permanent=True)
            return
        try:
            response = httpx.post(
                target.url,
                json=payload,
                headers=target.headers,
                timeout=self._settings.notify.timeout_seconds,
                verify=target.verify_tls,
            )
        except httpx.HTTPError as exc:
            self._failed(lease, name, f"{type(exc).__name__}: {exc}")
            return
        if response.is_success:
            status = f"HTTP {response.status_code}"
            self.succeed(lease, status=status)
            log.info("notification %d (%s) to %s: %s", lease.id, payload["event"], name, status)
            return
        self._failed(lease, name, f"HTTP {response.status_code}: {response.text[:200]}")

    def _failed(self, lease: Lease, name: str, error: str) -> None:
        state = self.fail(lease, error, permanent=False)
        log.warning("notification %d to %s failed (%s): %s", lease.id, name, state, error)
