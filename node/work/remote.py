"""`ainode worker --node URL`: a worker on another host that needs only the node's URL and a
`worker` token (no shared filesystem, no database credentials). It claims a job of a pipeline
it runs over the worker API (`node.web.workers`), renews the lease while it works, reads the
series by WADO-RS into a folder of its own, runs the pipeline as a local worker does, uploads
the result objects and records the outcome, or the failure."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient

from node.config import Settings
from node.work.inference import ResultTarget, process_series
from node.work.protocol import ClaimRequest, Ended, Failure, Result, Stored, Work
from node.work.worker import summarize
from pipelines.anatomy.shared import Anatomy
from pipelines.base import BadInput, Pipeline, Unavailable
from pipelines.context import Context

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 60.0
"""Each request to the node (a series is read instance by instance within it)."""


class LeaseLost(Exception):
    """The node gave the job to another worker (this one renewed too late)."""


class NodeClient:
    """The worker API and WADO-RS of one node, with the worker's token."""

    def __init__(self, url: str, token: str, worker: str, verify: bool | str = True) -> None:
        self.url = url.rstrip("/")
        self.worker = worker
        self.session = requests.Session()
        self.session.verify = verify
        self.session.headers["Authorization"] = f"Bearer {token}"
        self._wado = DICOMwebClient(
            url=f"{self.url}/dicom-web", session=self.session, timeout=TIMEOUT_SECONDS
        )
        self._wado.set_http_retry_params(retry=False)

    def claim(self, pipelines: list[str], device: str) -> Work | None:
        request = ClaimRequest(worker=self.worker, pipelines=pipelines, device=device)
        answer = self._call("POST", "/claim", json=request.model_dump())
        return None if answer.status_code == 204 else Work.model_validate_json(answer.content)

    def renew(self, job: int) -> None:
        self._call("PUT", f"/jobs/{job}/lease")

    def fail(self, job: int, detail: str, permanent: bool) -> Ended:
        failure = Failure(detail=detail[:2000] or "failed", permanent=permanent)
        answer = self._call("POST", f"/jobs/{job}/failure", json=failure.model_dump())
        return Ended.model_validate_json(answer.content)

    def upload(self, job: int, path: Path) -> Stored:
        headers = {"Content-Type": "application/dicom"}
        with path.open("rb") as body:
            answer = self._call("PUT", f"/jobs/{job}/objects", data=body, headers=headers)
        return Stored.model_validate_json(answer.content)

    def complete(self, job: int, result: Result) -> Ended:
        body = result.model_dump_json().encode()
        headers = {"Content-Type": "application/json"}
        answer = self._call("POST", f"/jobs/{job}/result", data=body, headers=headers)
        return Ended.model_validate_json(answer.content)

    def series(self, work: Work, folder: Path) -> list[Path]:
        """The job's instances as stored (any transfer syntax), written to `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        wanted = set(work.instances)
        files: list[Path] = []
        for dataset in self._wado.iter_series(
            work.study_instance_uid,
            work.series_instance_uid,
            media_types=(("application/dicom", "*"),),
        ):
            uid = str(dataset.SOPInstanceUID)
            if uid in wanted:
                path = folder / f"{len(files):05d}.dcm"
                dataset.save_as(path, enforce_file_format=True)
                files.append(path)
        if len(files) < len(wanted):
            raise RuntimeError(f"the node served {len(files)} of {len(wanted)} instances")
        return files

    def _call(self, method: str, path: str, **kwargs: object) -> requests.Response:
        answer = self.session.request(
            method,
            f"{self.url}/api/v1/worker{path}",
            params={"worker": self.worker},
            timeout=TIMEOUT_SECONDS,
            **kwargs,  # type: ignore[arg-type]
        )
        if answer.status_code == 409:
            raise LeaseLost(_detail(answer))
        if answer.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {answer.status_code} {_detail(answer)}")
        return answer


class RemoteWorker:
    """Runs the node's jobs of `pipelines` here, one at a time."""

    def __init__(
        self, client: NodeClient, settings: Settings, pipelines: Mapping[str, Pipeline], device: str
    ) -> None:
        self.client = client
        self._settings = settings
        self._pipelines = pipelines
        self._device = device

    def run(self, stopping: threading.Event, poll_seconds: float = 2.0) -> None:
        """Claim and run jobs until `stopping` (the job in hand is finished first)."""
        names = sorted(self._pipelines)
        while not stopping.is_set():
            try:
                work = self.client.claim(names, self._device)
            except (requests.RequestException, RuntimeError) as exc:
                log.warning("the node cannot be reached to claim a job: %s", exc)
                work = None
            if work is None:
                stopping.wait(poll_seconds)
                continue
            self.run_job(work)

    def run_job(self, work: Work) -> None:
        """Run one claimed job and report how it ended."""
        log.info(
            "job %d: %s on series %s rev %d (attempt %d)",
            work.job,
            work.pipeline,
            work.series_instance_uid,
            work.revision,
            work.attempt,
        )
        try:
            with self._renewing(work):
                self._succeed(work)
        except LeaseLost as exc:
            log.warning("job %d: lease lost, result dropped: %s", work.job, exc)
        except Exception as exc:
            permanent = isinstance(exc, BadInput | Unavailable)
            log.warning("job %d failed: %s", work.job, exc)
            try:
                self.client.fail(work.job, f"{type(exc).__name__}: {exc}", permanent)
            except (LeaseLost, requests.RequestException, RuntimeError) as lost:
                log.warning("job %d: its failure could not be recorded: %s", work.job, lost)

    def _succeed(self, work: Work) -> None:
        pipeline = self._pipelines.get(work.pipeline)
        if pipeline is None:
            raise BadInput(f"pipeline {work.pipeline!r} does not run on this worker")
        with tempfile.TemporaryDirectory(prefix=f"ainode-job-{work.job}-") as temp:
            folder = Path(temp)
            files = self.client.series(work, folder / "series")
            target = ResultTarget(
                work.revision,
                work.station,
                lambda _volume: folder / "results",
                work.guard,
                tuple(work.siblings),
            )
            context = Context.of(pipeline, anatomy=Anatomy())
            done = process_series(pipeline, files, self._settings.volume.options(), target, context)
            stored = [self.client.upload(work.job, path) for path in done.objects]
            embedding, profile = done.result.embedding, done.result.profile
            result = Result(
                summary=summarize(done),
                objects=[object_.sop_instance_uid for object_ in stored],
                embedding=None if embedding is None else embedding.tolist(),
                profile=None if profile is None else profile.tolist(),
            )
            self.client.complete(work.job, result)
        log.info("job %d succeeded", work.job)

    @contextmanager
    def _renewing(self, work: Work) -> Iterator[None]:
        """Renew the job's lease every third of it while the block runs."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(work.lease_seconds / 3):
                try:
                    self.client.renew(work.job)
                except LeaseLost:
                    log.warning("job %d: the node gave it to another worker", work.job)
                    return
                except (requests.RequestException, RuntimeError) as exc:
                    log.warning("job %d: lease not renewed this time: %s", work.job, exc)

        thread = threading.Thread(target=renew, name=f"renew-{work.job}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def device_description() -> str:
    """What the worker runs on, as the node logs it."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    properties = torch.cuda.get_device_properties(0)
    return f"cuda:0 {properties.name}, {properties.total_memory / 2**30:.0f} GiB"


def _detail(answer: requests.Response) -> str:
    try:
        return str(answer.json().get("detail", ""))[:300]
    except ValueError:
        return answer.text[:300]
