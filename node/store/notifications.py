"""Notification rows, queued in the transaction that ends a job (the worker's, the outcome's):
the row is written on the store floor, and `node.delivery.notify` sends it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from sqlalchemy import Connection, select

from node.config import NotificationTarget, NotifyOn
from node.store.db.models import Job, Notification, Series, Study, utcnow
from node.store.db.upsert import insert_into
from node.store.leased import queued


def queue_notifications(
    conn: Connection,
    job_id: int,
    targets: Mapping[str, NotificationTarget],
    events: Iterable[NotifyOn],
    max_attempts: int,
    **facts: object,
) -> int:
    """In the caller's transaction: one notification per target of the job that asks for one
    of `events`; `facts` join the JSON. Returns how many were queued."""
    job = conn.execute(
        select(
            Job.pipeline,
            Job.notify,
            Job.priority,
            Series.series_instance_uid,
            Study.study_instance_uid,
            Study.accession_number,
        )
        .join(Series, Series.id == Job.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Job.id == job_id)
    ).one()
    now, created = utcnow(), 0
    wanted = set(events)
    for name in job.notify:
        target = targets.get(name)
        if target is None:
            continue
        for event in sorted(wanted & set(target.on)):
            payload = {
                "event": event,
                "job": job_id,
                "pipeline": job.pipeline,
                "study_instance_uid": job.study_instance_uid,
                "series_instance_uid": job.series_instance_uid,
                "accession_number": job.accession_number,
                **facts,
            }
            inserted = conn.execute(
                insert_into(conn, Notification)
                .values(
                    job_id=job_id,
                    target=name,
                    event=event,
                    payload=json.dumps(payload, default=str),
                    priority=job.priority,
                    **queued(max_attempts, now),
                )
                .on_conflict_do_nothing()
            ).rowcount
            created += inserted
    return created
