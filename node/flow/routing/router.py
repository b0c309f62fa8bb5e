"""Turns completed series and studies into jobs, with rules reloaded when their file changes.

An invalid rules file never replaces the last good rules: the error is logged (and
`ainode status` shows it by checking the file itself).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, case, select, update

from node.flow.routing.engine import JobRequest, SeriesFacts, evaluate, route_series, route_study
from node.flow.routing.rules import PriorsRequest, RulesError, RuleSet, load_rules
from node.store.catalog import distance_of
from node.store.db.models import Instance, Series, SeriesState, Source, Study

log = logging.getLogger(__name__)


class RulesSource:
    """The current rules of a file, reloaded on change; the last good ones on error."""

    def __init__(
        self,
        path: Path | None,
        pipelines: Collection[str],
        destinations: Collection[str],
        notifications: Collection[str] = (),
    ) -> None:
        self.path = path
        self._pipelines = pipelines
        self._destinations = destinations
        self._notifications = notifications
        self._stamp: tuple[int, int] | None = None
        self._rules = RuleSet(())
        self.error: str | None = None

    def current(self) -> RuleSet:
        if self.path is None:
            return self._rules
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            self._record_error(f"{self.path}: cannot read: {exc.strerror}")
            return self._rules
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._rules = load_rules(
                    self.path, self._pipelines, self._destinations, self._notifications
                )
            except RulesError as exc:
                self._record_error(str(exc))
            else:
                self.error = None
                log.info(
                    "routing rules loaded: %d rules from %s", len(self._rules.rules), self.path
                )
        return self._rules

    def _record_error(self, message: str) -> None:
        if message != self.error:
            log.error("routing rules not (re)loaded, keeping the last good ones:\n%s", message)
        self.error = message


ROUTE_BATCH = 200
"""Series routed in one pass at most (each reads one stored header)."""


class JobSink(Protocol):
    """Where routing decisions go (`node.flow.queue.JobQueue`): jobs created once per series
    revision and pipeline; returns the ids of those new."""

    def enqueue(self, series_id: int, revision: int, requests: list[JobRequest]) -> list[int]: ...


class Router:
    """Routes completed series (series rules) and studies (study rules) to `queue`; asks
    `priors` for the priors of completed studies (rules with `fetch_priors`)."""

    def __init__(
        self,
        engine: Engine,
        storage: Path,
        rules: RulesSource,
        queue: JobSink,
        priors: PriorsSink | None = None,
        batch: int = ROUTE_BATCH,
    ) -> None:
        self._engine = engine
        self._batch = batch
        self._storage = storage
        self._rules = rules
        self._queue = queue
        self._priors = priors

    def facts(self, series_id: int) -> SeriesFacts | None:
        """The series' facts; None (and a log line) when it has no readable instance left:
        its instances moved to another series, or its stored header cannot be read."""
        from pydicom.errors import InvalidDicomError  # here: `ainode status` loads this module

        try:
            return stored_series_facts(self._engine, self._storage, series_id)
        except NoInstanceLeft as exc:
            log.info("series %d not routed: %s", series_id, exc)
        except (OSError, InvalidDicomError, ValueError) as exc:
            log.warning(
                "series %d not routed: its stored header cannot be read: %s", series_id, exc
            )
        return None

    def route_pending(self) -> int:
        """Route up to `batch` complete series revisions not routed yet, oldest first (a
        pass stays short, so the node stops promptly whatever arrived); return how many.

        Marking a revision routed happens after its jobs exist, and creating jobs is
        idempotent, so a crash in between loses nothing and duplicates nothing. The mark
        holds only if no one asked to route the series again meanwhile (`route_again`);
        else the next pass routes it again.
        """
        with self._engine.connect() as conn:
            pending = conn.execute(
                select(
                    Series.id, Series.series_instance_uid, Series.revision, Series.route_requests
                )
                .where(
                    Series.state == SeriesState.COMPLETE,
                    Series.routed_revision < Series.revision,
                    Series.source != Source.NODE,  # the node's own results
                )
                .order_by(Series.id)
                .limit(self._batch)
            ).all()
        if not pending:
            return 0
        rules = self._rules.current()
        for series_id, uid, revision, requests_seen in pending:
            facts = self.facts(series_id)
            requests = route_series(rules, facts)[0] if facts is not None else []
            created = self._queue.enqueue(series_id, revision, requests)
            with self._engine.begin() as conn:
                conn.execute(
                    update(Series)
                    .where(Series.id == series_id, Series.route_requests == requests_seen)
                    .values(routed_revision=revision)
                )
            pipelines = ", ".join(r.pipeline for r in requests) or "no pipeline"
            log.info("series %s revision %d routed: %s, jobs %s", uid, revision, pipelines, created)
        return len(pending)

    def studies_completed(self, study_ids: list[int]) -> None:
        rules = self._rules.current()
        for study_id in study_ids:
            with self._engine.connect() as conn:
                members = conn.execute(
                    select(Series.id, Series.revision).where(
                        Series.study_id == study_id,
                        Series.state == SeriesState.COMPLETE,
                        Series.source != Source.NODE,
                    )
                ).all()
            facts = [
                (self.facts(series_id), (series_id, revision)) for series_id, revision in members
            ]
            candidates = [found for found, _ in facts if found is not None]
            by_uid = {found.series_instance_uid: ids for found, ids in facts if found is not None}
            requests, _ = route_study(rules, candidates)
            self._ask_for_priors(rules, study_id, candidates)
            for request in requests:
                series_id, revision = by_uid[request.series_instance_uid]
                created = self._queue.enqueue(series_id, revision, [request])
                log.info(
                    "study rule %s picked series %s: jobs %s",
                    ", ".join(request.rules),
                    request.series_instance_uid,
                    created,
                )

    def _ask_for_priors(self, rules: RuleSet, study_id: int, series: list[SeriesFacts]) -> None:
        """Each rule with `fetch_priors` that matches a series of a (not prior) study asks
        for that study's priors."""
        if self._priors is None:
            return
        current = [facts for facts in series if not facts.is_prior]
        for rule in rules.rules:
            if rule.fetch_priors is None:
                continue
            if any(rule.match is None or evaluate(rule.match, facts) for facts in current):
                self._priors.fetch_priors(study_id, rule.fetch_priors)


def route_again(conn: Connection, series_id: int, revision: int) -> None:
    """Have the router route the series' `revision` again at its next pass (the rules or
    what they test changed); jobs that exist are not repeated. Counting the request keeps
    a pass that is routing the series now from marking it routed."""
    conn.execute(
        update(Series)
        .where(Series.id == series_id)
        .values(
            routed_revision=case(
                (Series.routed_revision >= revision, revision - 1),
                else_=Series.routed_revision,
            ),
            route_requests=Series.route_requests + 1,
        )
    )


class PriorsSink(Protocol):
    """Where requests for a study's priors go (`node.delivery.fetch.priors.PriorsQueue`)."""

    def fetch_priors(self, study_id: int, request: PriorsRequest) -> None: ...


class NoInstanceLeft(LookupError):
    """The series has no instance (they moved to another series under the same UIDs)."""


def stored_series_facts(engine: Engine, storage: Path, series_id: int) -> SeriesFacts:
    """What the rules see of a stored series: one instance's header and its context."""
    with engine.connect() as conn:
        series = conn.execute(
            select(
                Series.series_instance_uid,
                Series.calling_ae,
                Series.called_ae,
                Series.instance_count,
                Series.source,
                Series.revision,
                Study.prior_of,
            )
            .join(Study, Series.study_id == Study.id)
            .where(Series.id == series_id)
        ).one()
        path = conn.execute(
            select(Instance.path)
            .where(Instance.series_id == series_id)
            .order_by(Instance.instance_number, Instance.id)
            .limit(1)
        ).scalar_one_or_none()
        guard_distance = conn.execute(select(distance_of(series_id, series.revision))).scalar()
    if path is None:
        raise NoInstanceLeft(f"series {series.series_instance_uid} has no instance left")
    context = {
        "guard_distance": guard_distance,
        "calling_ae": series.calling_ae,
        "called_ae": series.called_ae,
        "instance_count": series.instance_count,
        "source": series.source.value,
        "is_prior": series.prior_of is not None,
    }
    return SeriesFacts.read(storage / path, series.series_instance_uid, context)
