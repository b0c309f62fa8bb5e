"""What the node holds, as the Query/Retrieve SCP serves it (`node.edge.qr.Archive`): the
catalog's matches and files (`node.store.query`), and each query and retrieve in the audit
trail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydicom import Dataset
from sqlalchemy import Engine

from node.edge.qr import Served
from node.ops.audit import Queried, Retrieved, record_quietly
from node.store.query import Level, StoredFile, criteria, each_match, stored_files


class CatalogArchive:
    """The catalog, queried at a level with an identifier's keys; each answer audited."""

    def __init__(self, engine: Engine, storage: Path) -> None:
        self._engine = engine
        self._storage = storage

    def matches(self, level: str, keys: list[tuple[str, str]]) -> Iterator[tuple[Dataset, bool]]:
        query = criteria(Level(level), keys)
        for match in each_match(self._engine, query):
            yield match, bool(query.ignored)

    def files(self, level: str, keys: list[tuple[str, str]]) -> list[StoredFile]:
        with self._engine.connect() as conn:
            return stored_files(conn, self._storage, criteria(Level(level), keys))

    def served(self, report: Served) -> None:
        if report.service == "C-FIND":
            facts: Queried | Retrieved = Queried(level=report.level, matches=report.matches)
        else:
            facts = Retrieved(
                service=report.service,
                level=report.level,
                destination=report.destination or report.calling_ae,
                instances=report.completed,
                failed=report.failed,
                studies=list(report.studies),
            )
        study = report.studies[0] if len(report.studies) == 1 else None
        record_quietly(self._engine, report.calling_ae, facts, study)
