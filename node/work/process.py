"""A worker process's entry point, light to import: the main process names it when it starts
a worker without loading torch, the pipelines or the encoders (seconds of start-up it does not
need); the worker process imports them itself."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

from node.config import Settings
from node.ops.lifecycle import Ready, exit_child, stop_when_parent_exits
from node.ops.logs import configure_logging

if TYPE_CHECKING:
    from node.work.prefetch import DecodedFrames

log = logging.getLogger(__name__)


def run_worker_process(settings: Settings, index: int, ready: Ready) -> None:
    """Work until SIGTERM, finishing the job in hand.

    While it loads torch and its pipelines (seconds, more under load) a SIGTERM ends it at
    once: there is nothing in hand to finish yet."""
    configure_logging(settings.logging.level)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from node.work.worker import Worker
    from pipelines.registry import build_pipelines

    pipelines = build_pipelines(settings.pipelines)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    stop_when_parent_exits(stopping)
    if index == 0:
        for name, pipeline in sorted(pipelines.items()):
            problem = pipeline.problem()
            if problem:
                log.warning("pipeline %s is unavailable: %s", name, problem)
    worker = Worker(settings, f"worker-{index}-{os.getpid()}", pipelines, _decoded(settings, index))
    worker.start_decoding_ahead(stopping)  # before ready: a series sent then is decoded
    ready.set()
    worker.run(stopping)
    exit_child()


def _decoded(settings: Settings, index: int) -> DecodedFrames | None:
    """The first worker decodes CT series as they arrive (the others would decode them
    again): where it keeps them, unless `workers.prefetch_mb` is 0."""
    if index != 0 or settings.workers.prefetch_mb == 0:
        return None
    from node.work.prefetch import DecodedFrames

    return DecodedFrames(settings.workers.prefetch_mb * 2**20)
