"""The storage SCP's recorder of storage commitment reports (`node.edge.commitment.Reports`):
a report from a peer the node asked to commit is recorded on the dispatch it answers,
audited and counted; anything else is refused with the status that says why."""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from node.config import Settings
from node.edge.commitment import CommitmentReport, EventReportStatus
from node.edge.messages import Reply
from node.ops.audit import Committed, record_quietly
from node.ops.metrics import COMMITMENTS
from node.store.commitments import Answered, record_report

log = logging.getLogger(__name__)


class CatalogReports:
    """Reports recorded on the catalog's dispatches."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._node_ae = settings.node.ae_title
        self._names: dict[str, list[str]] = {}
        """Peer AE title -> its names in `peers` that are asked to commit."""
        for name, peer in settings.peers.items():
            if peer.commitment:
                self._names.setdefault(peer.ae_title, []).append(name)

    def report(self, calling_ae: str, report: CommitmentReport) -> Reply:
        names = self._names.get(calling_ae)
        if not names:
            log.warning(
                "storage commitment report from %s refused: not asked to commit", calling_ae
            )
            comment = f"{calling_ae} is not asked for storage commitment"
            return Reply(EventReportStatus.INVALID_ARGUMENT_VALUE, comment)
        recorded = record_report(
            self._engine,
            (calling_ae, names),
            report.transaction_uid,
            report.committed,
            report.failed,
        )
        if recorded.answered == Answered.UNKNOWN:
            log.warning(
                "storage commitment report from %s for unknown transaction %s",
                calling_ae,
                report.transaction_uid,
            )
            return Reply(EventReportStatus.INVALID_ARGUMENT_VALUE, "unknown Transaction UID")
        assert recorded.dispatch is not None and recorded.destination is not None
        if recorded.answered == Answered.ALREADY:
            log.info(
                "storage commitment report for dispatch %d again (it no longer waits)",
                recorded.dispatch,
            )
            return Reply(EventReportStatus.SUCCESS)
        committed = recorded.answered == Answered.COMMITTED
        COMMITMENTS.labels(recorded.destination, "committed" if committed else "failed").inc()
        log.log(
            logging.INFO if committed else logging.WARNING,
            "dispatch %d to %s: %s",
            recorded.dispatch,
            recorded.destination,
            f"{len(recorded.committed)} instances committed" if committed else recorded.error,
        )
        facts = Committed(
            destination=recorded.destination,
            dispatch=recorded.dispatch,
            transaction_uid=report.transaction_uid,
            sop_instances=list(recorded.committed),
            failed=list(recorded.failed),
        )
        record_quietly(self._engine, calling_ae, facts, recorded.study_instance_uid)
        return Reply(EventReportStatus.SUCCESS)
