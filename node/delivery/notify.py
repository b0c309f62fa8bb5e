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

from sqlalchemy import Engine, select

from node.config import Settings
from node.store.db.models import Notification, WorkState
from node.store.leased import LeasedQueue, RetryPolicy, newest

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


class Notifier:
    """Claims due notifications and posts them; one per node (the main process)."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self.queue = LeasedQueue(engine, Notification, RetryPolicy.of(settings.dispatch))
        self._owner = f"notifier-{os.getpid()}"

    def run_due(self) -> int:
        with self._engine.begin() as conn:
            leases = self.queue.claim(conn, self._owner, LEASE_SECONDS, limit=8)
            rows = {
                row.id: row
                for row in conn.execute(
                    select(Notification.id, Notification.target, Notification.payload).where(
                        Notification.id.in_([lease.id for lease in leases])
                    )
                )
            }
        for lease in leases:
            row = rows[lease.id]
            self._post(lease.id, row.target, json.loads(row.payload))
        return len(leases)

    def _post(self, notification_id: int, name: str, payload: dict[str, Any]) -> None:
        import httpx  # here, not at the top: `ainode status` lists notifications without it

        target = self._settings.notifications.get(name)
        if target is None:
            error = f"notification {name!r} is no longer configured"
            self.queue.fail(notification_id, self._owner, error, permanent=True)
            return
        try:
            response = httpx.post(
                target.url,
                json=payload,
                headers=target.headers,
                timeout=self._settings.dispatch.timeout_seconds,
                verify=target.verify_tls,
            )
        except httpx.HTTPError as exc:
            self._failed(notification_id, name, f"{type(exc).__name__}: {exc}")
            return
        if response.is_success:
            with self._engine.begin() as conn:
                status = f"HTTP {response.status_code}"
                self.queue.succeed(conn, notification_id, self._owner, status=status)
            log.info(
                "notification %d (%s) to %s: %s", notification_id, payload["event"], name, status
            )
            return
        self._failed(notification_id, name, f"HTTP {response.status_code}: {response.text[:200]}")

    def _failed(self, notification_id: int, name: str, error: str) -> None:
        state = self.queue.fail(notification_id, self._owner, error, permanent=False)
        log.warning("notification %d to %s failed (%s): %s", notification_id, name, state, error)
