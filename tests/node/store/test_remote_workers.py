"""Remote workers as the worker API notes them, on each backend: a worker polling for work is
written once per interval, not once per claim, unless it says something new."""

from __future__ import annotations

from sqlalchemy import Engine

from node.store.remote_workers import Sightings, list_remote_workers


def test_a_polling_worker_is_noted_once_an_interval_unless_it_changes(engine: Engine) -> None:
    sightings = Sightings(engine)
    sightings.claimed("gpu-server/gpu-1", ["lung-quant"], "cuda:0 NVIDIA H100, 80 GiB")
    (first,) = list_remote_workers(engine)
    sightings.claimed("gpu-server/gpu-1", ["lung-quant"], "cuda:0 NVIDIA H100, 80 GiB")
    sightings.renewed("gpu-server/gpu-1")
    (again,) = list_remote_workers(engine)
    assert again.seen_at == first.seen_at  # not written again within the interval

    sightings.claimed("gpu-server/gpu-1", ["lung-quant", "echo"], "cuda:0 NVIDIA H100, 80 GiB")
    (changed,) = list_remote_workers(engine)
    assert changed.pipelines == ["lung-quant", "echo"] and changed.seen_at >= first.seen_at
    assert (changed.owner, changed.job) == ("gpu-server/gpu-1", None)
