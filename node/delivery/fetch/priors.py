"""A completed study's priors: the same patient's earlier studies, asked of a source once
per study and source (a study completing again does not ask twice)."""

from __future__ import annotations

import logging
from datetime import date, timedelta

from sqlalchemy import Engine, select

from node.delivery.fetch.query import FetchQuery, dicom_date
from node.delivery.fetch.records import enqueue
from node.flow.routing.rules import PriorsRequest
from node.store.db.models import Fetch, Study, WorkState

log = logging.getLogger(__name__)


class PriorsQueue:
    def __init__(self, engine: Engine, max_attempts: int) -> None:
        self._engine = engine
        self._max_attempts = max_attempts

    def fetch_priors(self, study_id: int, request: PriorsRequest) -> None:
        with self._engine.connect() as conn:
            study = conn.execute(
                select(Study.study_instance_uid, Study.patient_id, Study.study_date).where(
                    Study.id == study_id
                )
            ).one()
            asked = conn.execute(
                select(Fetch.id).where(
                    Fetch.prior_of == study.study_instance_uid,
                    Fetch.source == request.source,
                    Fetch.state != WorkState.CANCELLED,
                )
            ).first()
        if asked is not None:
            return
        if not study.patient_id:
            log.warning("study %s has no Patient ID: no priors fetched", study.study_instance_uid)
            return
        day = dicom_date(study.study_date) or date.today()
        query = FetchQuery(
            patient_id=study.patient_id,
            modality=request.modality,
            since=day - timedelta(days=request.within_days),
            before=day,
            exclude=study.study_instance_uid,
            count=request.count,
        )
        fetch_id = enqueue(
            self._engine, request.source, query, self._max_attempts, study.study_instance_uid
        )
        log.info(
            "fetch %d: priors of study %s from %s",
            fetch_id,
            study.study_instance_uid,
            request.source,
        )
