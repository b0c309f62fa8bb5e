"""The coordinator's lease on each backend: one holder at a time, renewed by it, taken by a
stand-by once expired or handed over."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine

from node.flow.leadership import COORDINATOR, Lease
from node.store.db.models import utcnow


def test_one_holds_the_lease_until_it_expires_or_is_handed_over(engine: Engine) -> None:
    first, second = (Lease(engine, COORDINATOR, name, 15) for name in ("host-a-1", "host-b-2"))
    now = utcnow()
    assert first.hold(now) and not second.hold(now)
    assert first.hold(now + timedelta(seconds=10))  # renewed: 15 s from here
    assert not second.hold(now + timedelta(seconds=20))
    later = now + timedelta(seconds=26)  # the first paused past its lease
    assert second.hold(later) and not first.hold(later)
    assert not first.active and second.active

    second.release()
    assert not second.active
    assert first.hold(later)  # at once, not after the lease
    assert not second.hold(later)


def test_a_new_duty_is_taken_by_exactly_one_of_two(engine: Engine) -> None:
    leases = [Lease(engine, "other-duty", f"host-{i}", 15) for i in range(2)]
    now = utcnow()
    assert [lease.hold(now) for lease in leases].count(True) == 1
