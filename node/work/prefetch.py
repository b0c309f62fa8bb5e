"""CT series decoded while they arrive: a worker thread decodes each instance of a receiving
CT series as soon as the receiver has recorded it, so that when the series completes its job
finds the pixels decoded and only reads the headers (on two cores, covid's 148 JPEG Lossless
slices took 4.2 s to load at job start, 1.4 s with this: `bench/latency.py`). The decoded
frames are kept, least recently used dropped first, within a memory bound; a file that
changed since it was decoded, or that was never seen, is decoded by the job."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, func, select

from node.store.db.models import Instance, Series, SeriesState
from pipelines.volume import stored_frames

log = logging.getLogger(__name__)

BATCH = 64
"""The most files one look at the catalog hands over to decode."""


class DecodedFrames:
    """Decoded pixel arrays of stored files, by path; the least recently used go first when
    they would hold more than `limit_bytes`. Thread-safe."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._held: OrderedDict[Path, tuple[tuple[int, int], np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0

    def frames(self, path: Path) -> np.ndarray:
        """The file's frames (a `pipelines.volume.FrameReader`): kept ones when the file is
        as it was decoded, else decoded now."""
        with self._lock:
            held = self._held.get(path)
            if held is not None:
                self._held.move_to_end(path)
        if held is not None and held[0] == _identity(path):
            with self._lock:  # a job reads its files from several threads
                self.hits += 1
            return held[1]
        return stored_frames(path)

    def add(self, path: Path, identity: tuple[int, int], pixels: np.ndarray) -> None:
        if pixels.nbytes > self.limit_bytes:
            return
        with self._lock:
            old = self._held.pop(path, None)
            if old is not None:
                self._bytes -= old[1].nbytes
            self._held[path] = (identity, pixels)
            self._bytes += pixels.nbytes
            while self._bytes > self.limit_bytes:
                _, (_, dropped) = self._held.popitem(last=False)
                self._bytes -= dropped.nbytes

    @property
    def held_bytes(self) -> int:
        return self._bytes


class Prefetcher:
    """Decodes into `cache` the files of CT series still receiving, in the order they were
    stored, from those stored after it started; one thread (the receiver has the other core:
    two decoding threads made the jobs no faster)."""

    def __init__(self, engine: Engine, root: Path, cache: DecodedFrames) -> None:
        self._engine = engine
        self._root = root
        self.cache = cache
        self._last: int | None = None  # the newest instance looked at; none before the first look

    def decode_arrived(self) -> int:
        """Decode the files stored since the last call that belong to receiving CT series
        (the first call only notes where the catalog stands); how many were decoded."""
        return sum(map(self._decode, self._arrived()))

    def _decode(self, path: Path) -> bool:
        try:
            identity = _identity(path)
            self.cache.add(path, identity, stored_frames(path))
        except Exception as exc:  # the job reports it, with the file's name
            log.debug("not decoded ahead: %s: %s", path.name, exc)
            return False
        return True

    def run(self, stopping: threading.Event, poll_seconds: float) -> None:
        while not stopping.is_set():
            try:
                if self.decode_arrived() == 0:
                    stopping.wait(poll_seconds)
            except Exception as exc:  # a busy database: the jobs decode for themselves
                log.warning("decoding ahead paused: %s", exc)
                stopping.wait(max(poll_seconds, 1.0))

    def _arrived(self) -> list[Path]:
        with self._engine.connect() as conn:
            latest = conn.execute(select(func.coalesce(func.max(Instance.id), 0))).scalar_one()
            if self._last is None:  # what was stored before the worker started is not ours
                self._last = latest
            if latest <= self._last:  # nothing stored since: an idle node costs one query
                return []
            rows = conn.execute(
                select(Instance.id, Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .where(
                    Instance.id > self._last,
                    Series.state == SeriesState.RECEIVING,
                    Series.modality == "CT",
                )
                .order_by(Instance.id)
                .limit(BATCH)
            ).all()
        if len(rows) < BATCH:  # every match up to `latest` is in hand: skip the others
            self._last = max(self._last, latest)
        if rows:
            self._last = max(self._last, rows[-1].id)
        return [self._root / row.path for row in rows]


def _identity(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns
