"""One active coordinator among those started: a lease row in the database that the active one
renews and a stand-by takes once it has expired (a stopped coordinator hands it over at once).

The coordinator's work (completion, routing, dispatch, retention, fetches, notifications,
workitems, audit export) is safe to overlap for a moment, since each item of it is itself
leased: a coordinator paused past its lease and a successor may both run one round.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, insert, update
from sqlalchemy.exc import IntegrityError

from node.store.db.models import Leadership, utcnow

log = logging.getLogger(__name__)

COORDINATOR = "coordinator"


class Lease:
    """This process's claim on a duty: `hold()` takes or renews it and says whether it is
    ours; between calls it is ours for `seconds`."""

    def __init__(self, engine: Engine, duty: str, holder: str, seconds: float) -> None:
        self.engine = engine
        self.duty = duty
        self.holder = holder
        self.seconds = seconds
        self.active = False

    def hold(self, now: datetime | None = None) -> bool:
        """Renew the lease if ours, take it if free or expired; whether it is ours now."""
        now = now or utcnow()
        expires = now + timedelta(seconds=self.seconds)
        ours = (Leadership.holder == self.holder) | (Leadership.expires_at < now)
        with self.engine.begin() as conn:
            taken = conn.execute(
                update(Leadership)
                .where(Leadership.duty == self.duty, ours)
                .values(holder=self.holder, expires_at=expires)
            ).rowcount
        if not taken:
            taken = self._first(expires)
        self._became(bool(taken))
        return self.active

    def release(self) -> None:
        """Give the duty up now (a clean stop): a stand-by takes it at its next `hold()`."""
        if not self.active:
            return
        with self.engine.begin() as conn:
            conn.execute(
                delete(Leadership).where(
                    Leadership.duty == self.duty, Leadership.holder == self.holder
                )
            )
        log.info("%s: %s handed over", self.duty, self.holder)
        self.active = False

    def _first(self, expires: datetime) -> int:
        """Take a duty nobody has held yet (the row's insert decides between two)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(Leadership).values(
                        duty=self.duty, holder=self.holder, expires_at=expires
                    )
                )
        except IntegrityError:
            return 0
        return 1

    def _became(self, active: bool) -> None:
        if active != self.active:
            log.info("%s: %s %s", self.duty, self.holder, "active" if active else "standing by")
        self.active = active
