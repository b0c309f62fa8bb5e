"""Worker processes: claim a job, run its pipeline on the stored series, record the outcome.

Each worker is its own process (the GPU belongs to processes, not threads) and keeps its
pipelines loaded between jobs. While a job runs, a thread renews its lease; a worker that
dies stops renewing, and the scheduler puts the job back in the queue.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from node.config import Settings
from node.edge.status import Status
from node.flow.queue import ClaimedJob, JobQueue
from node.ingest.intake import Delivery, Intake, Sender
from node.ingest.part10 import read_part10
from node.ops.metrics import GPU_MEMORY, JOB_SECONDS
from node.store.catalog import Catalog
from node.store.db.engine import make_engine
from node.store.db.models import Instance, Source
from node.store.leased import RetryPolicy, renewing
from node.store.storage import InstanceStore
from node.work.guard import GuardScore, series_score
from node.work.inference import (
    Loaded,
    Processed,
    ResultTarget,
    finish_series,
    load_series,
    process_series,
)
from node.work.outcome import JobOutcome, OutcomeRecorder, ResultSummary, audit_job_end
from node.work.prefetch import DecodedFrames, Prefetcher
from node.work.siblings import other_reconstructions
from pipelines.anatomy.shared import Anatomy
from pipelines.base import BadInput, BatchedPipeline, Pipeline, Stage, Unavailable
from pipelines.context import Context
from pipelines.result import PipelineResult
from pipelines.volume import Volume

log = logging.getLogger(__name__)


class Worker:
    """Runs jobs with `pipelines` (name -> pipeline, loaded once per process)."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        pipelines: Mapping[str, Pipeline],
        decoded: DecodedFrames | None = None,
    ) -> None:
        """`decoded`: where this worker keeps the CT series it decodes as they arrive."""
        self.name = name
        self._settings = settings
        self._engine = make_engine(settings.database.url)
        self.queue = JobQueue(self._engine, RetryPolicy.of(settings.workers))
        self._outcomes = OutcomeRecorder.of(self._engine, settings)
        self._store = InstanceStore(settings.storage.path)
        self._intake = Intake(self._store, Catalog(self._engine), settings.storage.min_free_mb)
        self._pipelines = pipelines
        self._anatomy = Anatomy(self.derived_folder)  # a series' lungs, once for every worker
        self._decoded = decoded
        self._frames = decoded.frames if decoded is not None else None

    def derived_folder(self, volume: Volume) -> Path:
        """Where the pipelines keep what they derive from `volume`'s series."""
        return self._store.derived_of(volume.study_instance_uid, volume.series_instance_uid)

    def run_once(self) -> bool:
        """Claim and run one job, or a batch of jobs of one pipeline that runs batches;
        False when the queue had nothing runnable."""
        lease = self._settings.workers.lease_seconds
        job = self.queue.claim(self.name, lease)
        if job is None:
            return False
        pipeline = self._pipelines.get(job.pipeline)
        jobs = [job]
        limit = pipeline.batch_limit() if isinstance(pipeline, BatchedPipeline) else 1
        if limit > 1:
            jobs += self._more_jobs(job, limit - 1)
        for claimed in jobs:
            log.info(
                "job %d: %s on series %s rev %d (attempt %d)",
                claimed.id,
                claimed.pipeline,
                claimed.series_instance_uid,
                claimed.revision,
                claimed.attempt,
            )
        with renewing(self.queue.leased, [claimed.id for claimed in jobs], self.name, lease, "job"):
            if len(jobs) > 1 and isinstance(pipeline, BatchedPipeline):
                self._run_batch(pipeline, jobs)
            else:
                started = time.monotonic()
                try:
                    done: Processed | Exception = self._execute(job)
                except Exception as exc:
                    done = exc
                self._settle(job, done, started)
        return True

    def _more_jobs(self, job: ClaimedJob, limit: int) -> list[ClaimedJob]:
        """Up to `limit` more waiting jobs of the job's pipeline, for one batch; none when
        the database is busy (the job in hand runs alone)."""
        try:
            return self.queue.claim_more(
                self.name, self._settings.workers.lease_seconds, job.pipeline, limit
            )
        except OperationalError as exc:
            log.warning("job %d runs alone: no more jobs claimed for its batch: %s", job.id, exc)
            return []

    def _settle(
        self, job: ClaimedJob, done: Processed | Exception, started: float, batch: int = 1
    ) -> None:
        """Record how the job ended: its result, or why it failed."""
        if isinstance(done, BadInput):
            state = self.queue.fail(job.id, self.name, f"bad input: {done}", permanent=True)
            log.warning("job %d failed (%s): %s", job.id, state, done)
            self._audit(job, str(state), None)
        elif isinstance(done, Unavailable):
            detail = f"pipeline {job.pipeline} unavailable: {done}"
            state = self.queue.fail(job.id, self.name, detail, permanent=True)
            log.warning("job %d failed (%s): %s", job.id, state, detail)
            self._audit(job, str(state), None)
        elif isinstance(done, Exception):
            detail = "".join(traceback.format_exception_only(done)).strip()
            state = self.queue.fail(job.id, self.name, detail, permanent=False)
            log.warning("job %d error (%s): %s", job.id, state, detail)
            self._audit(job, str(state), None)
        else:
            self._measure(job.pipeline, done, time.monotonic() - started)
            result = done.result
            kept = self._keep_results(job.id, done.objects)
            outcome = JobOutcome(
                job.id,
                self.name,
                summarize(done, batch, [self._stored(path) for path in kept]),
                kept,
                result.embedding,
                result.profile,
            )
            if self._outcomes.record(outcome):
                log.info("job %d succeeded in %.2f s", job.id, time.monotonic() - started)
                self._audit(job, "succeeded", done)
                _remove_copies(done.objects, kept)
            else:
                log.warning("job %d finished after losing its lease; result dropped", job.id)
                self._audit(job, "dropped", done)

    def _run_batch(self, pipeline: BatchedPipeline, jobs: list[ClaimedJob]) -> None:
        """Load each job's series (one that cannot be loaded fails alone), run them through
        the network together, encode each result. If the batch fails as a whole, each
        series runs alone, so that one cannot fail the others."""
        started = time.monotonic()
        ready: list[tuple[ClaimedJob, Loaded, GuardScore | None]] = []
        for job in jobs:
            try:
                files, guard = self._inputs(job)
                loaded = load_series(
                    pipeline,
                    files,
                    self._settings.volume.options(),
                    self._stage(job),
                    frames=self._frames,
                )
            except Exception as exc:
                self._settle(job, exc, started)
            else:
                ready.append((job, loaded, guard))
        if not ready:
            return
        context = self._context(pipeline, *(job for job, _, _ in ready))
        try:
            results: list[PipelineResult | Exception] = list(
                pipeline.run_batch([loaded.volume for _, loaded, _ in ready], context)
            )
        except Exception as exc:
            log.warning(
                "%s: a batch of %d series failed (%s); running each alone",
                pipeline.name,
                len(ready),
                exc,
            )
            results = [self._alone(pipeline, loaded, job) for job, loaded, _ in ready]
        for (job, loaded, guard), result in zip(ready, results, strict=True):
            try:
                if isinstance(result, Exception):
                    raise result
                done: Processed | Exception = self._finish(pipeline, job, loaded, result, guard)
            except Exception as exc:
                done = exc
            self._settle(job, done, started, len(ready))

    def _alone(
        self, pipeline: Pipeline, loaded: Loaded, job: ClaimedJob
    ) -> PipelineResult | Exception:
        try:
            return pipeline.run(loaded.volume, self._context(pipeline, job))
        except Exception as exc:
            return exc

    def start_decoding_ahead(self, stopping: threading.Event) -> None:
        """With a `decoded` store, note where the catalog stands now (what is stored from
        here on is decoded as it arrives), then decode in a thread until `stopping`."""
        if self._decoded is None:
            return
        prefetcher = Prefetcher(self._engine, self._settings.storage.path, self._decoded)
        try:
            prefetcher.decode_arrived()
        except Exception as exc:  # the thread tries again
            log.warning("decoding ahead not started: %s", exc)
        poll = self._settings.workers.poll_seconds
        threading.Thread(
            target=prefetcher.run, args=(stopping, poll), name="prefetch", daemon=True
        ).start()

    def run(self, stopping: threading.Event) -> None:
        poll = self._settings.workers.poll_seconds
        while not stopping.is_set():
            if not self.run_once():
                stopping.wait(poll)
        self._engine.dispose()

    def _execute(self, job: ClaimedJob) -> Processed:
        """Run the job's pipeline on the stored instances of its series revision."""
        pipeline = self._pipeline(job)
        files, guard = self._inputs(job)
        hits = self._decoded.hits if self._decoded is not None else 0
        done = process_series(
            pipeline,
            files,
            self._settings.volume.options(),
            self._target(job, pipeline, guard),
            self._context(pipeline, job),
            frames=self._frames,
        )
        if self._decoded is not None:
            ahead = self._decoded.hits - hits
            log.info("job %d: %d of %d files decoded as they arrived", job.id, ahead, len(files))
        return done

    def _finish(
        self,
        pipeline: Pipeline,
        job: ClaimedJob,
        loaded: Loaded,
        result: PipelineResult,
        guard: GuardScore | None,
    ) -> Processed:
        return finish_series(
            pipeline, loaded, result, self._target(job, pipeline, guard), self._stage(job)
        )

    def _target(
        self, job: ClaimedJob, pipeline: Pipeline, guard: GuardScore | None
    ) -> ResultTarget:
        siblings = other_reconstructions(self._engine, self._settings.storage.path, job.series_id)
        return ResultTarget(
            job.revision,
            self._settings.node.ae_title,
            self._folder_for(job, pipeline),
            guard,
            tuple(siblings),
        )

    def _context(self, pipeline: Pipeline, *jobs: ClaimedJob) -> Context:
        """The jobs' context: their stages reported, the worker's shared anatomy."""
        return Context.of(pipeline, self._stage(*jobs), self._anatomy)

    def _pipeline(self, job: ClaimedJob) -> Pipeline:
        pipeline = self._pipelines.get(job.pipeline)
        if pipeline is None:
            raise BadInput(f"pipeline {job.pipeline!r} is not installed on this node")
        return pipeline

    def _inputs(self, job: ClaimedJob) -> tuple[list[Path], GuardScore | None]:
        """The stored files of the job's series revision, and the series' guard score."""
        with self._engine.connect() as conn:
            paths = conn.execute(
                select(Instance.path).where(
                    Instance.series_id == job.series_id, Instance.revision <= job.revision
                )
            ).scalars()
            files = [self._settings.storage.path / p for p in paths]
            guard = series_score(conn, job.series_id, job.revision)
        return files, guard

    def _folder_for(self, job: ClaimedJob, pipeline: Pipeline) -> Callable[[Volume], Path]:
        return lambda volume: self._store.results_of(
            volume.study_instance_uid, job.series_instance_uid, job.revision, pipeline.name
        )

    def _stage(self, *jobs: ClaimedJob) -> Stage:
        """Notes each stage the jobs enter, for the dashboard."""

        def note(stage: str) -> None:
            for job in jobs:
                self._note_stage(job.id, stage)

        return note

    def _note_stage(self, job_id: int, stage: str) -> None:
        """Record the stage for the dashboard; a busy database only costs the note."""
        try:
            self.queue.set_stage(job_id, self.name, stage)
        except OperationalError as exc:
            log.debug("job %d: stage %r not recorded: %s", job_id, stage, exc)

    def _audit(self, job: ClaimedJob, state: str, done: Processed | None) -> None:
        audit_job_end(
            self._engine,
            self._settings,
            self.name,
            job,
            state,
            done.result if done is not None else None,
            done.volume.study_instance_uid if done is not None else None,
        )

    def _measure(self, pipeline: str, done: Processed, seconds: float) -> None:
        for stage, stage_seconds in done.result.timings.items():
            JOB_SECONDS.labels(pipeline, stage).observe(stage_seconds)
        JOB_SECONDS.labels(pipeline, "total").observe(seconds)
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            torch = sys.modules["torch"]
            GPU_MEMORY.labels(self.name).set(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def _keep_results(self, job_id: int, objects: list[Path]) -> list[Path]:
        """The job's SR and SEG join their study in the node's own store, where QIDO-RS and
        WADO-RS serve them beside the images (routing never takes them for input); where
        each object is now kept: in the store, or where it was written when the store did
        not take it (a result is kept once)."""
        ae_title = self._settings.node.ae_title
        delivery = Delivery(Sender(uuid.uuid4().hex, ae_title, ae_title, None, Source.NODE))
        kept = list(objects)
        try:
            for index, path in enumerate(objects):
                data = path.read_bytes()
                header = read_part10(data)
                dataset = data[header.dataset_offset :]
                answer = self._intake.accept(delivery, dataset, header.transfer_syntax)
                if answer.status == Status.SUCCESS and answer.meta is not None:
                    kept[index] = self._store.path_of(answer.meta.key)
                else:
                    log.warning("job %d: %s not kept: %s", job_id, path.name, answer.reason)
        except (OSError, ValueError) as exc:
            log.warning("job %d: results not kept in the store: %s", job_id, exc)
        finally:
            self._intake.close(delivery, released=True)
        return kept

    def _stored(self, path: Path) -> str:
        """`path` as the job's result names it: relative to the storage root."""
        return str(path.relative_to(self._settings.storage.path))


def _remove_copies(written: list[Path], kept: list[Path]) -> None:
    """Remove each object where it was written once the store holds it."""
    for path, home in zip(written, kept, strict=True):
        if home != path:
            path.unlink(missing_ok=True)


def summarize(done: Processed, batch: int = 1, files: list[str] | None = None) -> ResultSummary:
    """What the job records of its result; `files`: where each object is kept."""
    return ResultSummary.model_validate(
        {
            **done.result.as_json(),
            "batch": batch,
            "output": str(done.folder),
            "objects": [path.name for path in done.objects],
            "files": files or [],
            "dropped": list(done.volume.dropped),
        }
    )
