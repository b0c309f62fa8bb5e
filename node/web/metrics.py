"""`/metrics` in the Prometheus text format: what every process of the node counted
(prometheus-client's multiprocess mode), and what is read when scraped: the depth of each
queue by state and priority, and the free disk of the store."""

from __future__ import annotations

import os
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from node.roles import Role
from node.store.db.models import Dispatch, Fetch, Job
from node.web.context import Context, WebContext, requires

router = APIRouter()


@router.get(
    "/metrics",
    dependencies=[Depends(requires(Role.READER))],
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
)
async def metrics(context: Context) -> Response:
    body = await run_in_threadpool(_scrape, context)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _scrape(context: WebContext) -> bytes:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(_NodeCollector(context))
    return generate_latest(registry)


class _NodeCollector(Collector):
    def __init__(self, context: WebContext) -> None:
        self._context = context

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "ainode_queue_depth",
            "Rows of each queue (jobs, dispatches, fetches) by state and priority",
            labels=["queue", "state", "priority"],
        )
        with self._context.engine.connect() as conn:
            for name, table in (("jobs", Job), ("dispatches", Dispatch), ("fetches", Fetch)):
                rows = conn.execute(
                    select(table.state, table.priority, func.count()).group_by(
                        table.state, table.priority
                    )
                )
                for state, priority, count in rows:
                    depth.add_metric([name, str(state), str(priority)], count)
        yield depth
        free = GaugeMetricFamily("ainode_disk_free_bytes", "Free space of the store's disk")
        free.add_metric([], self._context.store.free_mb() * 1024 * 1024)
        yield free
